// SPDX-License-Identifier: MIT
/// @file A consumer of the installed package: configure, run once, check the output is finite.
#include <moba/moba.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  moba::config cfg;
  cfg.block_size = 4;
  cfg.top_k = 2;
  moba::attention<moba::reference, float> attn(cfg);
  const std::int64_t n = 16, heads = 2, dim = 8;
  std::vector<float> q(n * heads * dim), k(q.size()), v(q.size()), out(q.size(), NAN);
  for (std::size_t i = 0; i < q.size(); ++i) {
    q[i] = std::sin(0.1f * i);
    k[i] = std::cos(0.3f * i);
    v[i] = std::sin(0.7f * i + 1);
  }
  attn.forward({.q = moba::packed(q.data(), n, heads, dim),
                .k = moba::packed(k.data(), n, heads, dim),
                .v = moba::packed(v.data(), n, heads, dim),
                .out = moba::packed(out.data(), n, heads, dim)});
  for (float x : out)
    if (!std::isfinite(x)) return 1;
  std::printf("consumer: moba %s ok\n", moba::version_string);
  return 0;
}
