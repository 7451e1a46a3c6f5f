// The Python module that loads fnevr's CPU kernels (fnevr._C). Each op's sources (csrc/<op>/)
// define its kernel schemas (TORCH_LIBRARY_FRAGMENT, in <op>_cpu.cpp) and register its kernels per
// device (TORCH_LIBRARY_IMPL); autograd, fake kernels and backend choice live in Python (fnevr/ops).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fnevr's compiled CPU kernels", -1, nullptr};
  return PyModule_Create(&module);
}
