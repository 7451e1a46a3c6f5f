// Schemas of the compiled kernels, and the Python module that loads them (fnevr._C).
// Device kernels register themselves beside their sources (TORCH_LIBRARY_IMPL); autograd, fake
// kernels and backend choice live in Python (fnevr/ops), over these kernel-level entry points.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fnevr, m) {
  m.def("_composite_forward(Tensor color, Tensor density, bool inclusive, int activation) -> Tensor");
  m.def(
      "_composite_backward(Tensor grad_out, Tensor color, Tensor density, bool inclusive, "
      "int activation, bool color_grad) -> (Tensor, Tensor)");
  m.def(
      "_grid_sample_forward(Tensor input, Tensor grid, int mode, int padding, bool align_corners) -> Tensor");
  m.def(
      "_grid_sample_backward(Tensor grad_out, Tensor input, Tensor grid, int mode, int padding, "
      "bool align_corners, bool input_grad, bool grid_grad, bool deterministic) -> (Tensor, Tensor)");
}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fnevr's compiled CPU kernels", -1, nullptr};
  return PyModule_Create(&module);
}
