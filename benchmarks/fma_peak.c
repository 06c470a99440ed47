/* One core's peak fp32 multiply-add rate for a vector width: ACC independent chains of
 * acc = acc * b + c (an FMA where the target has one, else a multiply and an add), long enough to
 * hide the latency. Build per ISA (benchmarks/isa.py): -O3 -ffp-contract=fast -march=<level>
 * -DBYTES=<vector bytes>. Prints GFLOP/s (2 flops per lane per multiply-add). */
#include <stdio.h>
#include <time.h>

#define ACC 12
typedef float vec __attribute__((vector_size(BYTES)));
enum { LANES = BYTES / sizeof(float) };

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(void) {
  vec acc[ACC], b, c;
  for (int l = 0; l < LANES; ++l) b[l] = 0.999999f, c[l] = 1e-7f;
  for (int a = 0; a < ACC; ++a)
    for (int l = 0; l < LANES; ++l) acc[a][l] = (float)(a + l);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const long iters = 20000000;
    const double t0 = now();
    for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 12
      for (int a = 0; a < ACC; ++a) acc[a] = acc[a] * b + c;  /* unrolled: acc in registers */
      __asm__ volatile("" : "+x"(b));  /* keeps the loop from being folded */
    }
    const double rate = 2.0 * LANES * ACC * iters / (now() - t0) / 1e9;
    best = rate > best ? rate : best;
  }
  float sink = 0;
  for (int a = 0; a < ACC; ++a) sink += acc[a][0];
  printf("%.2f %g\n", best, sink);
  return 0;
}
