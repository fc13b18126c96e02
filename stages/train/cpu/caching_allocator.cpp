// A caching allocator for torch's large CPU tensors (train.allocator: caching).
//
// Why: a training step allocates its activations layer by layer, interleaved with temporaries
// that die a moment later, then frees them in backward while allocating gradients of the same
// sizes. glibc serves these (up to its 32 MB dynamic mmap threshold) from its heap, whose free
// holes between kept activations are rarely the right size for the next request, so the heap
// grows well past what is alive and keeps those pages. Pinning glibc's mmap threshold returns
// them but maps and faults every temporary afresh (1.4-1.8x slower steps, measured).
// Here large blocks come from their own mappings, kept after free in a cache by size and handed
// to the next request (a layer's shapes repeat in every layer and again in backward; across
// steps a block is cut to the new size, its tail cached, or gathered from several), freed
// neighbours joined again, so that steps of changing sizes reuse pages already faulted in
// instead of having the kernel zero new ones. At the end of a step, blocks that waited through
// it unused are unmapped while more than the run's peak in use (+1/8) is mapped: RSS stays near
// the largest step's need. Measured with the bench's issue-table settings (docs/benchmarks.md, "Allocator").
// Blocks under 128 KiB stay with malloc, which packs them well. (The limit was 1 MiB: then a
// step of short samples put 0.56 GB of its activations in glibc's heap, which keeps the pages,
// beside a cache holding the run's peak: peak RSS 5.30 GB on the issue table's fp32 run; from
// 128 KiB up they come from the cache: 4.66 GB.)
//
// Built by stages/train/allocator.py against the installed torch (c10 only, no Python headers).
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <pthread.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>

namespace {
constexpr size_t kLarge = size_t{1} << 17;  // smaller requests go to malloc
constexpr size_t kPage = size_t{1} << 16;   // large sizes rounded up to 64 KiB
constexpr size_t kHuge = size_t{2} << 20;   // transparent huge pages for blocks this large
constexpr size_t kAlign = 64;               // torch's CPU alignment (c10::gAlignment)
constexpr uint8_t kPriority = 100;          // above the default allocator's registration

std::mutex mu;
bool installed = false;
struct Free {
  void* p;
  size_t generation;  // the step it was freed in
};
std::unordered_map<void*, size_t> in_use;  // large block -> its mapped size
std::multimap<size_t, Free> cached;        // free large blocks by size
size_t in_use_bytes = 0, cached_bytes = 0, peak_in_use = 0, peak_mapped = 0;
size_t maps = 0, reuses = 0, resizes = 0, generation = 0, fresh_bytes = 0;
size_t run_peak_in_use = 0;  // since install: the default budget of release()

std::map<char*, size_t> cached_at;       // the same free blocks by address -> size

void cache_erase(std::multimap<size_t, Free>::iterator it) {
  cached_at.erase(static_cast<char*>(it->second.p));
  cached_bytes -= it->first;
  cached.erase(it);
}

void cache_erase_at(char* p, size_t size) {
  auto range = cached.equal_range(size);
  for (auto it = range.first; it != range.second; ++it) {
    if (it->second.p == p) {
      cache_erase(it);
      return;
    }
  }
}

// Cache a free block, joined with the free blocks right before and after it: a block cut
// earlier meets its tail again, and the next longer request takes them as one block whose pages
// are already faulted in. (Blocks from separate mappings that happen to be adjacent join too;
// munmap and a later cut work across them; a move that fails for it unmaps it instead.)
void cache_add(char* p, size_t size, size_t gen) {
  auto next = cached_at.find(p + size);
  if (next != cached_at.end()) {
    size_t more = next->second;
    cache_erase_at(p + size, more);
    size += more;
  }
  auto prev = cached_at.lower_bound(p);
  if (prev != cached_at.begin()) {
    --prev;
    char* q = prev->first;
    size_t before = prev->second;
    if (q + before == p) {
      cache_erase_at(q, before);
      p = q;
      size += before;
    }
  }
  cached.emplace(size, Free{p, gen});
  cached_at.emplace(p, size);
  cached_bytes += size;
}

// Unmap the cached blocks freed before step `before` (all of them: before = SIZE_MAX).
void unmap_cached_locked(size_t before) {
  for (auto it = cached.begin(); it != cached.end();) {
    if (it->second.generation < before) {
      munmap(it->second.p, it->first);
      auto next = std::next(it);
      cache_erase(it);
      it = next;
    } else {
      ++it;
    }
  }
}

void delete_block(void* p) {
  if (p == nullptr) return;
  {
    std::lock_guard<std::mutex> guard(mu);
    auto it = in_use.find(p);
    if (it != in_use.end()) {
      size_t size = it->second;
      in_use.erase(it);
      in_use_bytes -= size;
      if (installed) {
        cache_add(static_cast<char*>(p), size, generation);
      } else {
        munmap(p, size);  // uninstalled: blocks still alive then go straight back
      }
      return;
    }
  }
  free(p);  // a small block (posix_memalign)
}

void* try_map(size_t size) {
  // Blocks of 2 MiB or more start on a 2 MiB boundary, so every whole 2 MiB of them can be one
  // transparent huge page: a step faults its working set in again after each release, and
  // measured with plain kernels (3.4 GB in use per step) 4 KiB faults cost ~1.6 s of system
  // time per step where 2 MiB pages cost a fraction of it.
  size_t extra = size >= kHuge ? kHuge : 0;
  void* raw = mmap(nullptr, size + extra, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  if (extra == 0) return raw;
  auto start = reinterpret_cast<uintptr_t>(raw);
  uintptr_t aligned = (start + kHuge - 1) & ~(uintptr_t{kHuge} - 1);
  if (aligned > start) munmap(raw, aligned - start);
  if (aligned + size < start + size + extra) munmap(reinterpret_cast<void*>(aligned + size), start + extra - aligned);
  void* p = reinterpret_cast<void*>(aligned);
  madvise(p, size, MADV_HUGEPAGE);  // where THP is in "madvise" mode (the common default)
  return p;
}

void* map_block(size_t size) {
  void* p = try_map(size);
  if (p == nullptr) {
    unmap_cached_locked(SIZE_MAX);  // out of address space or memory: give the cache back, retry
    p = try_map(size);
    if (p == nullptr) throw std::bad_alloc();
  }
  ++maps;
  fresh_bytes += size;
  return p;
}

// A block of `size` when every cached block is smaller: a new mapping whose pages are moved in
// from cached blocks (mremap moves page-table entries: no copy, no zeroing, no fault), the
// largest first, the last one cut if it is larger than what is left; only the remainder faults
// in fresh. Growing one cached block instead (this allocator's earlier way) left the smaller
// ones mapped beside the new pages: with cut tails kept, peak RSS rose 4.73 -> 5.38 GB on the
// issue table's fp32 run.
void* gather(size_t size) {
  char* dst = static_cast<char*>(map_block(size));  // counted as fresh; moved bytes taken back
  size_t filled = 0;
  while (filled < size && !cached.empty()) {
    size_t left = size - filled;
    auto it = cached.upper_bound(left);  // the largest block that fits whole, else the next one
    if (it != cached.begin()) --it;
    char* src = static_cast<char*>(it->second.p);
    size_t have = it->first, take = have < left ? have : left;
    size_t gen = it->second.generation;
    cache_erase(it);
    if (take < have) cache_add(src + take, have - take, gen);
    if (mremap(src, take, take, MREMAP_MAYMOVE | MREMAP_FIXED, dst + filled) == MAP_FAILED) {
      munmap(src, take);  // spans two mappings (blocks joined across them): its pages go back
      continue;
    }
    filled += take;
    ++reuses;
  }
  fresh_bytes -= filled;
  return dst;
}

struct CachingCPUAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    if (n < kLarge) {
      if (posix_memalign(&p, kAlign, n > 0 ? n : 1) != 0) throw std::bad_alloc();
      return {p, p, &delete_block, c10::Device(c10::DeviceType::CPU)};
    }
    size_t size = (n + kPage - 1) / kPage * kPage;
    std::lock_guard<std::mutex> guard(mu);
    // The smallest cached block that holds the request serves it, as it is when a close fit,
    // else cut to size with its tail cached; when none holds it, cached blocks are gathered
    // into a new one (above). Sizes change from step to step with the batch, and pages reused
    // this way are memory the kernel need not zero and fault in again: releasing the whole
    // cache after every step instead cost plain kernels 1.15x the step time. Unmapping cut
    // tails and the blocks unused through a step (this allocator's first policy) still faulted
    // 210k pages on a repeated 970-token bf16 step; keeping, joining and gathering them, ~1k.
    // Of the blocks of the chosen size, the one freed last: still in the CPU caches. Taking the
    // oldest instead (the multimap's first) cost plain kernels 1.12x the wall time (whole-process
    // A/B pairs of bench/allocator_steps.py).
    auto it = cached.lower_bound(size);
    if (it != cached.end()) it = std::prev(cached.upper_bound(it->first));
    if (it != cached.end()) {
      size_t have = it->first;
      p = it->second.p;
      cache_erase(it);
      ++reuses;
      if (have > size + size / 8) {  // cut: at most 1/8 of a block is left unused
        cache_add(static_cast<char*>(p) + size, have - size, generation);  // the tail stays cached
        ++resizes;
      } else {
        size = have;
      }
    } else if (!cached.empty()) {
      p = gather(size);
    } else {
      p = map_block(size);
    }
    in_use.emplace(p, size);
    in_use_bytes += size;
    if (in_use_bytes > peak_in_use) peak_in_use = in_use_bytes;
    if (in_use_bytes > run_peak_in_use) run_peak_in_use = in_use_bytes;
    if (in_use_bytes + cached_bytes > peak_mapped) peak_mapped = in_use_bytes + cached_bytes;
    return {p, p, &delete_block, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &delete_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CachingCPUAllocator caching;
c10::Allocator* previous = nullptr;
bool fork_handlers = false;
}  // namespace

extern "C" {
// Make torch allocate CPU tensors here. Idempotent.
void sftflow_allocator_install() {
  std::lock_guard<std::mutex> guard(mu);
  if (installed) return;
  if (!fork_handlers) {  // a DataLoader worker forked mid-allocation must not inherit a held lock
    pthread_atfork([] { mu.lock(); }, [] { mu.unlock(); }, [] { mu.unlock(); });
    fork_handlers = true;
  }
  previous = c10::GetCPUAllocator();
  c10::SetCPUAllocator(&caching, kPriority);
  installed = true;
}

// Give torch its previous allocator back and unmap the cache; blocks still alive are unmapped
// when freed.
void sftflow_allocator_uninstall() {
  std::lock_guard<std::mutex> guard(mu);
  if (!installed) return;
  c10::SetCPUAllocator(previous, kPriority);
  installed = false;
  unmap_cached_locked(SIZE_MAX);
}

// The end of a step: while more than `budget` bytes are mapped (in use + cached), unmap cached
// blocks that waited through the whole step unused, largest first; the blocks this step freed
// wait for the next step. budget = SIZE_MAX: the run's peak in use plus 1/8 (the default);
// `all`: unmap the whole cache.
void sftflow_allocator_release(int all, size_t budget) {
  std::lock_guard<std::mutex> guard(mu);
  if (all) {
    unmap_cached_locked(SIZE_MAX);
  } else {
    if (budget == SIZE_MAX) budget = run_peak_in_use + run_peak_in_use / 8;
    for (auto it = cached.end(); it != cached.begin() && in_use_bytes + cached_bytes > budget;) {
      --it;
      if (it->second.generation < generation) {
        munmap(it->second.p, it->first);
        auto next = std::next(it);
        cache_erase(it);
        it = next;
      }
    }
  }
  ++generation;
}

// in use, cached, peak in use, peak mapped (bytes; peaks since the last reset), maps, reuses,
// resizes (reuses that cut a block), bytes newly mapped (their pages fault in fresh).
void sftflow_allocator_stats(size_t* out, int reset_peaks) {
  std::lock_guard<std::mutex> guard(mu);
  out[0] = in_use_bytes;
  out[1] = cached_bytes;
  out[2] = peak_in_use;
  out[3] = peak_mapped;
  out[4] = maps;
  out[5] = reuses;
  out[6] = resizes;
  out[7] = fresh_bytes;
  if (reset_peaks) {
    peak_in_use = in_use_bytes;
    peak_mapped = in_use_bytes + cached_bytes;
  }
}
}
