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
  m.def(
      "_mlp_composite_forward(Tensor color_code, Tensor shape_code, Tensor[] params, bool inclusive, "
      "int activation) -> (Tensor, Tensor)");
  m.def(
      "_mlp_composite_backward(Tensor grad_features, Tensor grad_weight_sum, Tensor color_code, "
      "Tensor shape_code, Tensor[] params, bool inclusive, int activation) -> Tensor[]");
  m.def("_spade_norm_stats(Tensor x, bool channels_last, bool batch) -> (Tensor, Tensor)");
  m.def(
      "_spade_norm_forward(Tensor x, Tensor gamma, Tensor beta, Tensor mean, Tensor var, float eps, "
      "bool channels_last, int activation, float slope) -> Tensor");
  m.def(
      "_spade_norm_backward_reduce(Tensor grad_y, Tensor x, Tensor gamma, Tensor beta, Tensor mean, "
      "Tensor var, float eps, bool channels_last, int activation, float slope) -> Tensor");
  m.def(
      "_spade_norm_backward(Tensor grad_y, Tensor x, Tensor gamma, Tensor beta, Tensor mean, Tensor var, "
      "Tensor group_sums, float scale, float eps, bool channels_last, int activation, float slope, "
      "bool gamma_grad, bool beta_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_spade_norm_instance_forward(Tensor x, Tensor gamma, Tensor beta, float eps, int activation, "
      "float slope) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_spade_norm_instance_backward(Tensor grad_y, Tensor x, Tensor gamma, Tensor beta, Tensor mean, "
      "Tensor var, float eps, int activation, float slope, bool gamma_grad, bool beta_grad) "
      "-> (Tensor, Tensor, Tensor)");
}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fnevr's compiled CPU kernels", -1, nullptr};
  return PyModule_Create(&module);
}
