// Makes bise_kernels._C importable; importing it runs the TORCH_LIBRARY registrations of every
// translation unit linked in (csrc/cpu/*.cpp always, csrc/cuda/* when built WITH_CUDA).
#include <Python.h>

static struct PyModuleDef bise_kernels_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&bise_kernels_C_module);
  if (module == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
