#include "thread_pool.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace ovfast {
namespace {

// One parallel_for call: chunks are claimed with an atomic counter by whoever runs the job.
struct Job {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t n, chunk, chunks;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex m;
  std::condition_variable finished;
  std::exception_ptr error;

  // Runs one unclaimed chunk; false when none is left.
  bool run_one() {
    int64_t i = next.fetch_add(1);
    if (i >= chunks) return false;
    try {
      (*fn)(i * chunk, std::min(n, (i + 1) * chunk));
    } catch (...) {
      std::lock_guard<std::mutex> lock(m);
      if (!error) error = std::current_exception();
    }
    if (done.fetch_add(1) + 1 == chunks) {
      std::lock_guard<std::mutex> lock(m);
      finished.notify_all();
    }
    return true;
  }
};

class Pool {
 public:
  explicit Pool(int threads) : threads_(std::max(1, threads)) {
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { work(); });
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) {
      // A nested parallel_for can drop the last reference on a worker: never join oneself.
      if (t.get_id() == std::this_thread::get_id()) t.detach(); else t.join();
    }
  }

  int size() const { return threads_; }

  void run(const std::shared_ptr<Job>& job) {
    if (job->chunks > 1 && !workers_.empty()) {
      {
        std::lock_guard<std::mutex> lock(m_);
        jobs_.push_back(job);
      }
      wake_.notify_all();
    }
    while (job->run_one()) {
    }
    {
      std::unique_lock<std::mutex> lock(job->m);
      job->finished.wait(lock, [&] { return job->done.load() == job->chunks; });
    }
    retire(job);
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  void work() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(m_);
        wake_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
        if (stop_) return;
        job = jobs_.front();
      }
      while (job->run_one()) {
      }
      retire(job);
    }
  }

  void retire(const std::shared_ptr<Job>& job) {
    std::lock_guard<std::mutex> lock(m_);
    auto it = std::find(jobs_.begin(), jobs_.end(), job);
    if (it != jobs_.end()) jobs_.erase(it);
  }

  const int threads_;
  std::vector<std::thread> workers_;
  std::mutex m_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Job>> jobs_;
  bool stop_ = false;
};

std::mutex g_mutex;
std::shared_ptr<Pool> g_pool;
pid_t g_pid = 0;
int g_threads = 0;  // 0: not chosen yet

std::shared_ptr<Pool> current_pool() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_pool && g_pid != getpid()) {
    // A forked child has none of the parent's workers: leak the old pool (joining would hang).
    new std::shared_ptr<Pool>(std::move(g_pool));
  }
  if (!g_pool) {
    int n = g_threads > 0 ? g_threads : static_cast<int>(std::thread::hardware_concurrency());
    g_pool = std::make_shared<Pool>(n);
    g_pid = getpid();
  }
  return g_pool;
}

}  // namespace

int num_threads() { return current_pool()->size(); }

void set_num_threads(int n) {
  std::shared_ptr<Pool> old;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_threads = std::max(1, n);
    old = std::move(g_pool);  // joined when its last running parallel_for returns
  }
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  std::shared_ptr<Pool> pool = current_pool();
  auto job = std::make_shared<Job>();
  // About eight chunks per thread: rows cost unevenly, and on a shared machine a thread can lose
  // its core for a while; claiming a chunk costs one atomic increment.
  int64_t target = static_cast<int64_t>(pool->size()) * 8;
  job->chunk = std::max<int64_t>(std::max<int64_t>(grain, 1), (n + target - 1) / target);
  job->chunks = (n + job->chunk - 1) / job->chunk;
  job->n = n;
  job->fn = &fn;
  pool->run(job);
}

}  // namespace ovfast
