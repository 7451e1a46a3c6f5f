// The Python module that loads fnevr's CUDA kernels (fnevr._C_cuda). Load fnevr._C first: it
// defines the schemas these kernels implement.
#include <Python.h>

extern "C" PyObject* PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "fnevr's compiled CUDA kernels", -1, nullptr};
  return PyModule_Create(&module);
}
