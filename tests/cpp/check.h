// What the ctests of the shared math headers share: PASS/FAIL lines and a running worst error.
#pragma once

#include <cmath>
#include <cstdio>
#include <string>

namespace fnevr_test {

inline int passed = 0, failed = 0;

// worst < 0: a yes/no check with no error to report.
inline void check(bool ok, const std::string& what, double worst = -1) {
  ++(ok ? passed : failed);
  std::printf("%s  %s", ok ? "PASS" : "FAIL", what.c_str());
  if (!(worst < 0)) std::printf("  (worst err/tol %.3g)", worst);
  std::printf("\n");
}

// Largest |got - want| / (atol + rtol |want|) seen; NaN sticks, so it fails the final <= 1.
struct Worst {
  double v = 0;
  void add(double got, double want, double rtol, double atol) {
    const double e = std::fabs(got - want) / (atol + rtol * std::fabs(want));
    if (!(e <= v)) v = e;
  }
  bool ok() const { return v <= 1; }
};

// The summary line and the process's exit status.
inline int summary() {
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace fnevr_test
