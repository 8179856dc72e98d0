// Hot loops are compiled twice, for AVX2 and for the baseline ISA, and picked at load time, so
// one build runs everywhere and still gets 8-lane integer arithmetic where the CPU has it.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define OVFAST_VECTORIZE __attribute__((target_clones("avx2", "default")))
#else
#define OVFAST_VECTORIZE
#endif
