// A small process-wide thread pool for the preprocessing loops (tiles, rows, frames).
#pragma once

#include <cstdint>
#include <functional>

namespace ovfast {

// Threads used by parallel_for, the calling thread included (>= 1).
int num_threads();
void set_num_threads(int n);

// Runs fn(begin, end) over [0, n) in chunks of at least `grain` items, on the pool's workers and
// the calling thread, and returns when every chunk is done. The first exception thrown by a chunk
// is rethrown here. Safe to call from several threads at once, and from inside a chunk.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace ovfast
