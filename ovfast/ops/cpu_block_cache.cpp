// A cache of large CPU blocks in front of torch's CPU allocator.
//
// Why: a prefill allocates and frees tensors of tens to hundreds of MB every layer (the MLP's
// (tokens, 2 x intermediate) product alone is 57 MB in bf16 at 2,948 tokens, 115 MB in fp32).
// glibc serves such sizes with a fresh mmap and returns them with munmap on free, so every layer
// touches new pages: 340,000-1,400,000 page faults per image request on the development VM, a
// tenth of a bf16 prefill's time. vLLM's CPU build avoids the same cost by preloading tcmalloc;
// this keeps the blocks inside the process instead, for torch's tensors only.
//
// What: allocations of at least `min_bytes` are rounded up to whole 2 MiB pages and come from
// blocks freed earlier when one fits (at most a quarter, or one page, larger than asked), else
// from a new mapping (2 MiB aligned, transparent huge pages asked for). Freed blocks are kept,
// up to `limit_bytes` in all; beyond it the least recently freed go back to the system. Smaller
// allocations go to the allocator this one replaced, untouched. Installed by
// block_cache_configure (ovfast/ops/cpu_native.py, at a CPU engine's load), never at load of
// the library; limit 0 empties the cache and sends new allocations back to the old allocator.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kPage = size_t(2) << 20;  // a huge page; also the rounding of every cached block

class BlockCache final : public c10::Allocator {
 public:
  explicit BlockCache(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(size_t n) override {
    // Every CPU tensor comes through here, a decode step's many small ones too: the sizes are
    // read without the lock, which only the blocks themselves need.
    if (n < min_bytes_.load(std::memory_order_relaxed) || limit_.load(std::memory_order_relaxed) == 0)
      return base_->allocate(n);
    const size_t size = (n + kPage - 1) / kPage * kPage;
    void* p = take(size);
    if (p == nullptr) p = map(size);
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void configure(int64_t limit, int64_t min_bytes) {
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      limit_ = size_t(limit), min_bytes_ = size_t(std::max<int64_t>(min_bytes, 1));
      trim(size_t(limit), drop);
    }
    unmap(drop);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {int64_t(cached_bytes_), int64_t(used_bytes_), int64_t(hits_), int64_t(misses_), int64_t(free_.size())};
  }

  // The deleter of every DataPtr this allocator hands out (and of raw_allocate's pointers).
  static void release(void* p);

 private:
  struct Block {
    void* ptr;
    size_t size;
    uint64_t freed_at;  // for eviction, least recently freed first
  };

  // A cached block of at least `size` bytes and not much more, or nullptr.
  void* take(size_t size) {
    std::lock_guard<std::mutex> g(mu_);
    const size_t most = std::max(size + size / 4, size + kPage);
    size_t best = free_.size();
    for (size_t i = 0; i < free_.size(); ++i)
      if (free_[i].size >= size && free_[i].size <= most && (best == free_.size() || free_[i].size < free_[best].size))
        best = i;
    if (best == free_.size()) {
      ++misses_;
      return nullptr;
    }
    Block b = free_[best];
    free_.erase(free_.begin() + best);
    cached_bytes_ -= b.size, used_bytes_ += b.size, ++hits_;
    live_[b.ptr] = b.size;
    return b.ptr;
  }

  void* map(size_t size) {
    void* p = map_aligned(size);
    if (p == nullptr) {  // out of address space or memory: give the cache back and try once more
      std::vector<Block> drop;
      {
        std::lock_guard<std::mutex> g(mu_);
        trim(0, drop);
      }
      unmap(drop);
      p = map_aligned(size);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "ovfast block cache: could not map ", size, " bytes");
    std::lock_guard<std::mutex> g(mu_);
    live_[p] = size;
    used_bytes_ += size;
    return p;
  }

  static void* map_aligned(size_t size) {
    // Over-map by one page and cut to a 2 MiB boundary, so the block can sit on huge pages.
    void* raw = mmap(nullptr, size + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (start + kPage - 1) / kPage * kPage;
    if (aligned > start) munmap(raw, aligned - start);
    const size_t tail = start + size + kPage - (aligned + size);
    if (tail > 0) munmap(reinterpret_cast<void*>(aligned + size), tail);
#ifdef MADV_HUGEPAGE
    madvise(reinterpret_cast<void*>(aligned), size, MADV_HUGEPAGE);  // a hint: fine where refused
#endif
    return reinterpret_cast<void*>(aligned);
  }

  static void unmap(const std::vector<Block>& blocks) {
    for (const Block& b : blocks) munmap(b.ptr, b.size);
  }

  // Moves blocks out of the cache, least recently freed first, until at most `keep` bytes stay.
  // Called with mu_ held; the caller unmaps them after letting it go.
  void trim(size_t keep, std::vector<Block>& drop) {
    while (cached_bytes_ > keep && !free_.empty()) {
      size_t oldest = 0;
      for (size_t i = 1; i < free_.size(); ++i)
        if (free_[i].freed_at < free_[oldest].freed_at) oldest = i;
      drop.push_back(free_[oldest]);
      cached_bytes_ -= free_[oldest].size;
      free_.erase(free_.begin() + oldest);
    }
  }

  // True if `p` was one of ours (now cached or unmapped).
  bool give_back(void* p) {
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = live_.find(p);
      if (it == live_.end()) return false;
      const size_t size = it->second;
      live_.erase(it);
      used_bytes_ -= size;
      if (size > limit_.load(std::memory_order_relaxed)) {
        drop.push_back({p, size, 0});
      } else {
        free_.push_back({p, size, ++clock_});
        cached_bytes_ += size;
        trim(limit_.load(std::memory_order_relaxed), drop);
      }
    }
    unmap(drop);
    return true;
  }

  c10::Allocator* base_;
  std::mutex mu_;
  std::atomic<size_t> limit_{0}, min_bytes_{size_t(4) << 20};  // written under mu_, read anywhere
  size_t cached_bytes_ = 0, used_bytes_ = 0;
  uint64_t hits_ = 0, misses_ = 0, clock_ = 0;
  std::vector<Block> free_;                   // cached blocks: a few dozen at most, scanned linearly
  std::unordered_map<void*, size_t> live_;    // blocks handed out, by address
};

BlockCache* g_cache = nullptr;  // created once, never destroyed: tensors may outlive everything
std::once_flag g_once;

void BlockCache::release(void* p) {
  if (p == nullptr) return;
  if (!g_cache->give_back(p)) g_cache->base_->raw_deleter()(p);  // a small block: the old allocator's
}

void block_cache_configure(int64_t limit_bytes, int64_t min_bytes) {
  TORCH_CHECK(limit_bytes >= 0 && min_bytes > 0, "block_cache_configure: limit >= 0 and min_bytes > 0, got ",
              limit_bytes, ", ", min_bytes);
  std::call_once(g_once, [] {
    c10::Allocator* base = c10::GetCPUAllocator();
    TORCH_CHECK(base->raw_deleter() != nullptr, "block_cache_configure: the CPU allocator has no raw deleter");
    g_cache = new BlockCache(base);
    c10::SetCPUAllocator(g_cache, /*priority=*/1);
  });
  g_cache->configure(limit_bytes, min_bytes);
}

std::vector<int64_t> block_cache_stats() {
  if (g_cache == nullptr) return {0, 0, 0, 0, 0};
  return g_cache->stats();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ovfast_cpu, m) {
  m.def("block_cache_configure(int limit_bytes, int min_bytes) -> ()", &block_cache_configure);
  m.def("block_cache_stats() -> int[]", &block_cache_stats);
}
