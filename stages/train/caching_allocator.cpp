// A caching allocator for torch's large CPU tensors (train.allocator: caching).
//
// Why: a training step allocates its activations layer by layer, interleaved with temporaries
// that die a moment later, then frees them in backward while allocating gradients of the same
// sizes. glibc serves these (up to its 32 MB dynamic mmap threshold) from its heap, whose free
// holes between kept activations are rarely the right size for the next request, so the heap
// grows well past what is alive and keeps those pages. Pinning glibc's mmap threshold returns
// them but maps and faults every temporary afresh (1.4-1.8x slower steps, measured).
// Here each large block is its own mapping, kept after free in a cache by size and handed to the
// next request (a layer's shapes repeat in every layer and again in backward; across steps a
// block is cut or grown to the new size), and blocks that wait through a whole step unused are
// unmapped at its end: RSS follows what is alive. Measured with the bench's issue-table
// settings (docs/benchmarks.md, "Allocator"). Small blocks (< 1 MiB) stay with malloc, which
// packs them well.
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
constexpr size_t kLarge = size_t{1} << 20;  // smaller requests go to malloc
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
size_t maps = 0, reuses = 0, resizes = 0, generation = 0;

// Unmap the cached blocks freed before step `before` (all of them: before = SIZE_MAX).
void unmap_cached_locked(size_t before) {
  for (auto it = cached.begin(); it != cached.end();) {
    if (it->second.generation < before) {
      munmap(it->second.p, it->first);
      cached_bytes -= it->first;
      it = cached.erase(it);
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
        cached.emplace(size, Free{p, generation});
        cached_bytes += size;
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
  return p;
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
    // A cached block serves any request: a close fit as it is, a larger one cut to size (its
    // tail unmapped), a smaller one grown in place or moved by the kernel (mremap: its pages
    // are not copied, only the new ones fault). Sizes change from step to step with the batch,
    // and a block reused this way is memory the kernel need not zero and fault in again:
    // releasing the whole cache after every step instead cost plain kernels 1.15x the step time.
    // Of the blocks of the chosen size, the one freed last: still in the CPU caches. Taking the
    // oldest instead (the multimap's first) cost plain kernels 1.12x the wall time (whole-process
    // A/B pairs of bench/allocator_steps.py).
    auto it = cached.lower_bound(size);
    if (it == cached.end() && !cached.empty()) it = std::prev(cached.end());
    if (it != cached.end()) it = std::prev(cached.upper_bound(it->first));
    if (it == cached.end()) {
      p = map_block(size);
    } else {
      size_t have = it->first;
      p = it->second.p;
      cached.erase(it);
      cached_bytes -= have;
      ++reuses;
      if (have > size + size / 8) {  // cut: at most 1/8 of a block is left unused
        munmap(static_cast<char*>(p) + size, have - size);
        ++resizes;
      } else if (have < size) {
        void* moved = mremap(p, have, size, MREMAP_MAYMOVE);
        if (moved == MAP_FAILED) {
          munmap(p, have);
          p = map_block(size);
        } else {
          p = moved;
          ++resizes;
        }
      } else {
        size = have;
      }
    }
    in_use.emplace(p, size);
    in_use_bytes += size;
    if (in_use_bytes > peak_in_use) peak_in_use = in_use_bytes;
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

// The end of a step: unmap the cached blocks that waited through the whole step unused (all of
// them with `all`); the blocks this step freed wait for the next step.
void sftflow_allocator_release(int all) {
  std::lock_guard<std::mutex> guard(mu);
  unmap_cached_locked(all ? SIZE_MAX : generation);
  ++generation;
}

// in use, cached, peak in use, peak mapped (bytes; peaks since the last reset), maps, reuses,
// resizes (reuses that cut or grew a block).
void sftflow_allocator_stats(size_t* out, int reset_peaks) {
  std::lock_guard<std::mutex> guard(mu);
  out[0] = in_use_bytes;
  out[1] = cached_bytes;
  out[2] = peak_in_use;
  out[3] = peak_mapped;
  out[4] = maps;
  out[5] = reuses;
  out[6] = resizes;
  if (reset_peaks) {
    peak_in_use = in_use_bytes;
    peak_mapped = in_use_bytes + cached_bytes;
  }
}
}
