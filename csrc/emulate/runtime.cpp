// The CUDA emulation's runtime (include/dspark/emulate/runtime.h): clusters of blocks run one
// after another (a launch without clusters: clusters of one block); the threads of a
// cluster's blocks are fibers scheduled round-robin, each running until it has to wait for
// others at a barrier or warp collective. On x86-64 a fiber switch is a
// few instructions (switch_stack below); elsewhere it is ucontext's swapcontext, which
// costs a system call per switch.
//
// Sanitizers: the fiber switches are announced to AddressSanitizer
// (__sanitizer_{start,finish}_switch_fiber) and ThreadSanitizer (__tsan_switch_to_fiber, no
// implied synchronisation); the runtime's own bookkeeping is hidden from ThreadSanitizer
// (__tsan_ignore_thread_begin/end), which sees only the synchronisation CUDA defines:
// barriers and __syncwarp (release on arrival, acquire on departure), the end of a launch,
// and the kernel's own atomics. The hooks are weak symbols, present when the process runs
// with a sanitizer runtime, so this file is built the same way for every build.
#include "dspark/emulate/runtime.h"

#include <pthread.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#if defined(__x86_64__)
// switch_stack(&saved, next): pushes the callee-saved registers and the floating-point
// control words on the current stack, stores the stack pointer in *saved, continues on
// the stack `next` (saved the same way, or prepared by Context::start) and returns there.
extern "C" void dspark_emulate_switch_stack(void** saved, void* next);
asm(R"(
  .text
  .globl dspark_emulate_switch_stack
  .hidden dspark_emulate_switch_stack
  .type dspark_emulate_switch_stack, @function
dspark_emulate_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size dspark_emulate_switch_stack, .-dspark_emulate_switch_stack
)");
#endif

extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size) __attribute__((weak));
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old)
    __attribute__((weak));
void __asan_unpoison_memory_region(void const volatile* addr, size_t size) __attribute__((weak));
void __asan_poison_memory_region(void const volatile* addr, size_t size) __attribute__((weak));
void* __tsan_get_current_fiber() __attribute__((weak));
void* __tsan_create_fiber(unsigned flags) __attribute__((weak));
void __tsan_destroy_fiber(void* fiber) __attribute__((weak));
void __tsan_switch_to_fiber(void* fiber, unsigned flags) __attribute__((weak));
void __tsan_acquire(void* addr) __attribute__((weak));
void __tsan_release(void* addr) __attribute__((weak));
void __tsan_ignore_thread_begin() __attribute__((weak));
void __tsan_ignore_thread_end() __attribute__((weak));
void AnnotateNewMemory(const char* file, int line, const volatile void* mem, size_t size) __attribute__((weak));
// The __shared__ variables of the kernels (device.h puts them in this section).
extern char __start_dspark_shared[] __attribute__((weak, visibility("hidden")));
extern char __stop_dspark_shared[] __attribute__((weak, visibility("hidden")));
}

namespace dspark::emulate {


namespace {

constexpr unsigned kTsanNoSync = 1u;           // __tsan_switch_to_fiber_no_sync
constexpr std::size_t kMaxExchangeBytes = 64;  // per lane and collective
constexpr unsigned char kSharedGarbage = 0xFF; // uninitialised shared memory: NaN, -1
constexpr unsigned kTsanWorkers = 2;           // block workers under ThreadSanitizer (StackPool)

std::size_t stack_bytes() {
  static const std::size_t bytes = [] {
    const char* env = std::getenv("DSPARK_EMULATE_STACK_KB");
    const long kb = env ? std::atol(env) : 128;
    return static_cast<std::size_t>(std::max(64L, kb)) * 1024;
  }();
  return bytes;
}

// Under ThreadSanitizer, one TSan thread per warp (default) or per CUDA thread
// (DSPARK_EMULATE_TSAN_LANES=1). TSan's cost grows with the number of its threads (every
// barrier merges vector clocks of that size): per warp is about 20x faster, and still
// reports races between warps (a missing __syncthreads), but not between the lanes of
// one warp (a missing __syncwarp).
bool tsan_thread_per_lane() {
  static const bool per_lane = [] {
    const char* env = std::getenv("DSPARK_EMULATE_TSAN_LANES");
    return env != nullptr && std::atoi(env) != 0;
  }();
  return per_lane;
}

// Seconds a launch may run before the watchdog ends the process (a kernel that never
// reaches a barrier, for example spinning on a flag another block would set).
int time_limit_seconds() {
  static const int seconds = [] {
    const char* env = std::getenv("DSPARK_EMULATE_TIMEOUT_S");
    return env ? std::max(1, std::atoi(env)) : 300;
  }();
  return seconds;
}

std::string where_string(Location where) {
  const char* file = where.file ? where.file : "?";
  const char* slash = std::strrchr(file, '/');
  return std::string(slash ? slash + 1 : file) + ":" + std::to_string(where.line);
}

bool same_location(Location a, Location b) {
  return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

std::string hex(unsigned mask) {
  char text[16];
  std::snprintf(text, sizeof(text), "0x%08x", mask);
  return text;
}

// A fiber stack: `bytes` above a PROT_NONE guard page (an overflow faults instead of
// corrupting the neighbour).
struct Stack {
  char* bottom;
  std::size_t bytes;
  bool abandoned = false;       // its last fiber stopped mid-frame (a failed launch)
  void* tsan_fiber = nullptr;   // the ThreadSanitizer thread of every fiber on this stack
};

// Fiber stacks, mapped in chunks of 1024 as launches need them and never unmapped. One set of
// stacks per block worker, one stack per CUDA thread of a cluster (up to 8 blocks of 1024):
// the launching thread maps them (before handing the cluster to the worker, under
// ThreadSanitizer's ignores: new memory for it, whatever the addresses held before).
//
// Under ThreadSanitizer every fiber on a stack is the same TSan thread (created once), and
// the threads of a block happen after those of the worker's previous block (which used the
// same stacks and shared memory): their frames and shared memory do not "race". Blocks on
// different workers stay unordered, so with kTsanWorkers = 2 a conflict between neighbouring
// blocks is reported (the usual bug: thread 0 of every block writing the same address).
class StackPool {
 public:
  static constexpr unsigned kChunk = 1024;
  static constexpr unsigned kThreadsPerSet = kMaxClusterBlocks * 1024;

  StackPool(std::size_t stack_bytes, unsigned sets) : stack_bytes_(stack_bytes), sets_(sets) {
    // Reserved at once: a Stack never moves (fibers point to theirs, and a warp's lane-0
    // stack is found as `stack - lane`).
    for (std::vector<Stack>& set : sets_) set.reserve(kThreadsPerSet);
  }

  // Stack `thread` (a CUDA thread of the cluster: rank * threads per block + linear id) of
  // set `set`, mapped on first use.
  Stack* stack(unsigned set, unsigned thread) {
    std::vector<Stack>& stacks = sets_[set];
    while (stacks.size() <= thread) map_chunk(stacks);
    return &stacks[thread];
  }

  // Ends the TSan threads of the fibers (at the end of a launch, which orders everything
  // after it): TSan's cost grows with the history a thread keeps.
  void end_tsan_threads() {
    for (std::vector<Stack>& stacks : sets_)
      for (Stack& stack : stacks)
        if (stack.tsan_fiber) {
          __tsan_destroy_fiber(stack.tsan_fiber);
          stack.tsan_fiber = nullptr;
        }
  }

 private:
  static std::size_t page() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }
  std::size_t slot_bytes() const { return page() + stack_bytes_; }

  void map_chunk(std::vector<Stack>& stacks) {
    void* p = mmap(nullptr, slot_bytes() * kChunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) throw Error("dspark emulation: cannot map the fiber stacks");
    char* base = static_cast<char*>(p);
    for (std::size_t i = 0; i < kChunk; ++i) {
      mprotect(base + i * slot_bytes(), page(), PROT_NONE);
      stacks.push_back(Stack{base + i * slot_bytes() + page(), stack_bytes_});
    }
  }

  std::size_t stack_bytes_;
  std::vector<std::vector<Stack>> sets_;
};

enum class State { kRunnable, kWaiting, kDone, kFailed };

struct Meeting;

// A saved execution context: where a fiber (or the scheduler) continues.
struct Context {
#if defined(__x86_64__)
  void* stack_pointer = nullptr;

  // Prepares the stack so that the first switch here "returns" into entry().
  void start(char* bottom, std::size_t bytes, void (*entry)()) {
    auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(bottom + bytes) & ~uintptr_t{15});
    uint32_t control[2];
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
    // The switch pops 8 words and returns into entry with the stack pointer at top - 1
    // (16n + 8 bytes, as right after a call), where entry finds its return address: 0.
    uint64_t* sp = top - 9;
    sp[0] = static_cast<uint64_t>(control[0]) | (static_cast<uint64_t>(control[1] & 0xFFFFu) << 32);
    for (int reg = 1; reg <= 6; ++reg) sp[reg] = 0;  // r15 r14 r13 r12 rbx rbp
    sp[7] = reinterpret_cast<uint64_t>(entry);
    sp[8] = 0;
    stack_pointer = sp;
  }
  static void switch_to(Context& from, Context& to) { dspark_emulate_switch_stack(&from.stack_pointer, to.stack_pointer); }
#else
  ucontext_t context;

  void start(char* bottom, std::size_t bytes, void (*entry)()) {
    getcontext(&context);
    context.uc_stack.ss_sp = bottom;
    context.uc_stack.ss_size = bytes;
    context.uc_link = nullptr;
    makecontext(&context, entry, 0);
  }
  static void switch_to(Context& from, Context& to) { swapcontext(&from.context, &to.context); }
#endif
};

struct Block;

struct Fiber {
  ThreadInfo info;
  Block* block = nullptr;
  Context context;
  Stack* stack = nullptr;
  State state = State::kRunnable;
  const Meeting* waiting_in = nullptr;  // for deadlock reports
  void* asan_fake_stack = nullptr;
  void* tsan_fiber = nullptr;
  int tsan_ignores = 0;  // open __tsan_ignore_thread_begin of this fiber
};

// One meeting of threads: a block or cluster barrier, or a warp collective. Its address is
// the ThreadSanitizer synchronisation object of that meeting.
struct Meeting {
  const char* what;
  bool barrier;   // __syncthreads or cluster_sync (no mask)
  unsigned mask;  // warp collectives: the member lanes
  Location where;
  std::size_t bytes;
  unsigned arrived_lanes = 0;
  int arrived = 0;
  int leaving = 0;  // participants that have not left yet; the last one recycles it
  unsigned pool = 0;
  std::vector<Fiber*> waiters;           // capacity for all participants: never reallocated
  unsigned char values[32 * kMaxExchangeBytes];  // lane l's contribution at l * bytes
};

// Meetings are recycled, not allocated per barrier: an allocation under ThreadSanitizer
// records a stack trace, which was most of the emulation's time. A recycled meeting keeps
// its synchronisation history, so each warp (and each barrier) has its own pool: one warp's
// __syncwarp never orders another warp.
struct MeetingPools {
  std::vector<std::unique_ptr<Meeting>> meetings;
  std::vector<std::vector<Meeting*>> free;  // per pool
  std::size_t max_participants = 0;         // the waiters' capacity

  void init(std::size_t pools, std::size_t participants) {
    free.resize(pools);
    for (auto& f : free) f.reserve(16);
    max_participants = participants;
  }

  Meeting* get(unsigned pool, const char* what, bool barrier, unsigned mask, Location where, std::size_t bytes,
               int participants);

  void leave(Meeting* m);
};

struct Cluster;

struct Block {
  Cluster* cluster = nullptr;
  uint3 index;
  unsigned rank = 0;  // in the cluster
  std::vector<Fiber> fibers;
  unsigned num_threads = 0;
  unsigned running = 0;  // threads that have not finished
  Meeting* barrier = nullptr;
  std::vector<std::vector<Meeting*>> warp_meetings;  // per warp, open meetings
  MeetingPools meetings;  // a pool per warp, and the barrier's (pool `warps`)
  unsigned char* dynamic_shared = nullptr;  // malloc'ed: AddressSanitizer knows its end
};

// The blocks of one cluster (one block without clusters), run by one scheduler.
struct Cluster {
  const char* kernel_name;
  uint3 index;  // in clusters: blockIdx / dims
  dim3 dims;
  std::vector<Block> blocks;  // by rank
  int num_threads = 0;
  std::size_t dynamic_shared_bytes = 0;
  Meeting* barrier = nullptr;  // the open cluster_sync
  MeetingPools meetings;       // one pool, cluster_sync's
  std::string error;
  const Block* error_block = nullptr;  // the block of the thread that failed (none: a deadlock)
};

// Scheduler state of the OS thread that runs a launch.
thread_local const ThreadInfo* current_thread = nullptr;  // null outside a kernel
thread_local Cluster* tls_cluster = nullptr;
thread_local Block* tls_block = nullptr;  // the block of the fiber running now
thread_local Fiber* tls_fiber = nullptr;  // the fiber running now
thread_local Context tls_scheduler_context;
thread_local void* tls_scheduler_tsan_fiber = nullptr;
thread_local const void* tls_scheduler_stack_bottom = nullptr;
thread_local std::size_t tls_scheduler_stack_size = 0;
thread_local const std::function<void()>* tls_body = nullptr;
// ThreadSanitizer: a cluster's scheduler (which started after the launch) happens before the
// cluster's threads, their ends before the launch's return and before the threads of the
// next cluster on the same worker (which reuses its shared memory).
char block_start_token;
char launch_end_token;
thread_local char tls_worker_token;

// The runtime is compiled without ThreadSanitizer's instrumentation (CMakeLists.txt), so
// its own loads and stores are invisible to it; what it does through intercepted libc
// calls (allocation, memcpy, strings) is hidden with these ignores, kept off the hot paths
// (an ignore records a stack trace). Ignores are counted per fiber: the lanes of a warp
// may share a TSan thread, and a fiber switches out with its ignores and back in with them.
void tsan_ignore_begin() {
  if (!__tsan_ignore_thread_begin) return;
  __tsan_ignore_thread_begin();
  if (tls_fiber) ++tls_fiber->tsan_ignores;
}

void tsan_ignore_end() {
  if (!__tsan_ignore_thread_end) return;
  if (tls_fiber) --tls_fiber->tsan_ignores;  // still ignored
  __tsan_ignore_thread_end();
}

struct TsanIgnore {
  TsanIgnore() { tsan_ignore_begin(); }
  ~TsanIgnore() { tsan_ignore_end(); }
};

// A copy that is not a call of the intercepted memcpy (the byte loop is not turned into one).
void copy_bytes(void* to, const void* from, std::size_t bytes) {
  auto* out = static_cast<volatile unsigned char*>(to);
  const auto* in = static_cast<const unsigned char*>(from);
  for (std::size_t i = 0; i < bytes; ++i) out[i] = in[i];
}

Meeting* MeetingPools::get(unsigned pool, const char* what, bool barrier, unsigned mask, Location where,
                           std::size_t bytes, int participants) {
  std::vector<Meeting*>& available = free[pool];  // sized by the launcher
  if (available.empty()) {
    const TsanIgnore ignore;
    meetings.push_back(std::make_unique<Meeting>());
    meetings.back()->waiters.reserve(max_participants);
    available.push_back(meetings.back().get());
  }
  Meeting* m = available.back();
  available.pop_back();
  m->pool = pool;
  m->what = what;
  m->barrier = barrier;
  m->mask = mask;
  m->where = where;
  m->bytes = bytes;
  m->arrived_lanes = 0;
  m->arrived = 0;
  m->leaving = participants;
  return m;
}

void MeetingPools::leave(Meeting* m) {
  if (--m->leaving != 0) return;
  std::vector<Meeting*>& available = free[m->pool];
  if (available.size() == available.capacity()) {
    const TsanIgnore ignore;
    available.reserve(2 * available.capacity() + 8);
  }
  available.push_back(m);
}

std::string index_string(unsigned x, unsigned y, unsigned z) {
  return "(" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + ")";
}

std::string block_string(const Block& block) { return index_string(block.index.x, block.index.y, block.index.z); }

// "kernel K, block (x,y,z)", or with clusters "kernel K, cluster (i,j,k) of blocks (..) to
// (..)[, block (x,y,z)]": where an error happened.
std::string place_string(const Cluster& cluster, const Block* block) {
  std::string place = "kernel " + std::string(cluster.kernel_name);
  if (cluster.blocks.size() == 1) return place + ", block " + block_string(cluster.blocks[0]);
  place += ", cluster " + index_string(cluster.index.x, cluster.index.y, cluster.index.z) + " of blocks " +
           block_string(cluster.blocks.front()) + " to " + block_string(cluster.blocks.back());
  if (block) place += ", block " + block_string(*block);
  return place;
}

// Fiber side: give control back to the scheduler; returns when the scheduler resumes us.
void switch_to_scheduler(bool finished) {
  Fiber* self = tls_fiber;
  if (__sanitizer_start_switch_fiber)
    __sanitizer_start_switch_fiber(finished ? nullptr : &self->asan_fake_stack, tls_scheduler_stack_bottom,
                                   tls_scheduler_stack_size);
  if (__tsan_switch_to_fiber) {
    // The lanes of a warp may share a TSan thread: this lane's ignores leave with it.
    for (int i = 0; i < self->tsan_ignores; ++i) __tsan_ignore_thread_end();
    __tsan_switch_to_fiber(tls_scheduler_tsan_fiber, kTsanNoSync);
  }
  Context::switch_to(self->context, tls_scheduler_context);
  if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(self->asan_fake_stack, nullptr, nullptr);
}

void fiber_entry() {
  if (__tsan_acquire) {
    __tsan_acquire(&block_start_token);
    __tsan_acquire(&tls_worker_token);
  }
  if (__sanitizer_finish_switch_fiber)
    __sanitizer_finish_switch_fiber(nullptr, &tls_scheduler_stack_bottom, &tls_scheduler_stack_size);
  Fiber* self = tls_fiber;
  try {
    (*tls_body)();
  } catch (const std::exception& e) {
    if (tls_cluster->error.empty()) {
      tls_cluster->error = std::string("a thread threw: ") + e.what();
      tls_cluster->error_block = self->block;
    }
  }
  if (__tsan_release) {
    __tsan_release(&launch_end_token);
    __tsan_release(&tls_worker_token);
  }
  self->state = State::kDone;
  self->stack->abandoned = false;
  switch_to_scheduler(/*finished=*/true);
  std::abort();  // a finished fiber is never resumed
}

// Watchdog: ends the process when a launch runs past the time limit (a CUDA thread that
// never yields cannot be stopped any other way), naming the thread that ran last.
std::atomic<long long> watchdog_deadline_ns{0};
std::atomic<const char*> watchdog_kernel{nullptr};
std::atomic<unsigned> watchdog_cluster_dims[3];  // (0,0,0): no clusters
std::atomic<unsigned> watchdog_block[3];
std::atomic<unsigned> watchdog_thread{0};

// Scheduler side: run fiber f until it waits, finishes or fails.
void resume(Fiber& f) {
  tls_fiber = &f;
  tls_block = f.block;
  current_thread = &f.info;
  watchdog_block[0].store(f.info.block_idx.x, std::memory_order_relaxed);
  watchdog_block[1].store(f.info.block_idx.y, std::memory_order_relaxed);
  watchdog_block[2].store(f.info.block_idx.z, std::memory_order_relaxed);
  watchdog_thread.store(f.info.linear, std::memory_order_relaxed);
  void* fake_stack = nullptr;
  if (__sanitizer_start_switch_fiber) __sanitizer_start_switch_fiber(&fake_stack, f.stack->bottom, f.stack->bytes);
  if (__tsan_switch_to_fiber) {
    __tsan_switch_to_fiber(f.tsan_fiber, kTsanNoSync);
    for (int i = 0; i < f.tsan_ignores; ++i) __tsan_ignore_thread_begin();  // and come back with it
  }
  Context::switch_to(tls_scheduler_context, f.context);
  if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
  tls_fiber = nullptr;
  tls_block = nullptr;
  current_thread = nullptr;
}

// Fiber side: wait until the meeting completes.
void wait_in(Meeting& meeting, Fiber& self) {
  self.state = State::kWaiting;
  self.waiting_in = &meeting;
  meeting.waiters.push_back(&self);
  switch_to_scheduler(false);
}

void complete(Meeting& meeting) {
  for (Fiber* waiter : meeting.waiters) {
    waiter->state = State::kRunnable;
    waiter->waiting_in = nullptr;
  }
  meeting.waiters.clear();
}

std::string describe(const Meeting& meeting) {
  if (meeting.barrier) return std::string(meeting.what) + " at " + where_string(meeting.where);
  return std::string(meeting.what) + "(mask " + hex(meeting.mask) + ") at " + where_string(meeting.where);
}

// Error paths build strings (intercepted allocations): DSPARK_FAIL_HERE hides them.
#define DSPARK_FAIL_HERE(message) (tsan_ignore_begin(), fail_here(message))

[[noreturn]] void fail_here(const std::string& message) {
  Cluster& cluster = *tls_cluster;
  Fiber& self = *tls_fiber;
  if (cluster.error.empty()) {
    const ThreadInfo& t = self.info;
    cluster.error = message + " (thread (" + std::to_string(t.thread_idx.x) + "," + std::to_string(t.thread_idx.y) +
                    "," + std::to_string(t.thread_idx.z) + "), warp " + std::to_string(t.warp) + " lane " +
                    std::to_string(t.lane) + ")";
    cluster.error_block = self.block;
  }
  self.state = State::kFailed;
  switch_to_scheduler(false);
  std::abort();  // a failed fiber is never resumed
}

std::string thread_list(const std::vector<unsigned>& ids) {
  std::ostringstream out;
  for (std::size_t i = 0; i < ids.size() && i < 8; ++i) out << (i ? "," : "") << ids[i];
  if (ids.size() > 8) out << ",... (" << ids.size() << " threads)";
  return out.str();
}

// Where every unfinished thread is, when none can run (with clusters, per block).
std::string deadlock_report(const Cluster& cluster) {
  const bool clustered = cluster.blocks.size() > 1;
  std::map<std::pair<unsigned, std::string>, std::vector<unsigned>> by_place;  // (rank, place)
  for (const Block& block : cluster.blocks) {
    const std::string prefix = clustered ? "block " + block_string(block) + " " : "";
    for (const Fiber& f : block.fibers) {
      std::string place = f.state == State::kDone ? "exited"
                          : f.waiting_in          ? "waiting at " + describe(*f.waiting_in)
                                                  : "stopped";
      by_place[{block.rank, prefix + place}].push_back(f.info.linear);
    }
  }
  std::ostringstream out;
  out << "deadlock: no thread can make progress (on a GPU this kernel hangs). Threads (linear ids"
      << (clustered ? " in their block" : "") << "):";
  for (const auto& [place, ids] : by_place) out << "\n  " << place.second << ": " << thread_list(ids);
  return out.str();
}

// The shared-memory section holds garbage at the start of each cluster, and is new memory
// for ThreadSanitizer (the previous cluster's accesses were to another SM's memory).
void reset_shared_memory() {
  if (!__start_dspark_shared || !__stop_dspark_shared) return;
  const std::size_t bytes = static_cast<std::size_t>(__stop_dspark_shared - __start_dspark_shared);
  std::memset(__start_dspark_shared, kSharedGarbage, bytes);
  if (AnnotateNewMemory) AnnotateNewMemory(__FILE__, __LINE__, __start_dspark_shared, bytes);
}

// Whether a thread wrote to the shared-memory section since reset_shared_memory: a kernel
// that uses static __shared__ variables, wrong in a cluster of more than one block (its
// blocks would share the one copy). Only outside the ThreadSanitizer build, where the
// variables are thread_local instead (device.h).
bool static_shared_written() {
  if (!__start_dspark_shared || !__stop_dspark_shared) return false;
  const unsigned char* p = reinterpret_cast<const unsigned char*>(__start_dspark_shared);
  const unsigned char* end = reinterpret_cast<const unsigned char*>(__stop_dspark_shared);
  const uint64_t garbage = 0x0101010101010101ull * kSharedGarbage;
  for (; p + sizeof(uint64_t) <= end; p += sizeof(uint64_t)) {
    uint64_t word;
    std::memcpy(&word, p, sizeof(word));
    if (word != garbage) return true;
  }
  for (; p < end; ++p)
    if (*p != kSharedGarbage) return true;
  return false;
}

void start_watchdog() {
  static std::once_flag once;
  std::call_once(once, [] {
    std::thread([] {
      for (;;) {
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        const long long deadline = watchdog_deadline_ns.load();
        const long long now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                  std::chrono::steady_clock::now().time_since_epoch()).count();
        if (deadline != 0 && now > deadline) {
          // The thread that ran last: the one that never yields.
          unsigned b[3], c[3];
          for (int i = 0; i < 3; ++i) {
            b[i] = watchdog_block[i].load();
            c[i] = watchdog_cluster_dims[i].load();
          }
          char cluster[96] = "";
          if (c[0] != 0)
            std::snprintf(cluster, sizeof(cluster), "cluster (%u,%u,%u), ", b[0] / c[0], b[1] / c[1], b[2] / c[2]);
          std::fprintf(stderr,
                       "dspark emulation watchdog: kernel %s ran longer than %d s (DSPARK_EMULATE_TIMEOUT_S), last in "
                       "%sblock (%u,%u,%u), thread %u: a thread that never reaches a barrier or collective, or spins "
                       "on a value another thread or block sets; ending the process\n",
                       watchdog_kernel.load(), time_limit_seconds(), cluster, b[0], b[1], b[2],
                       watchdog_thread.load());
          std::fflush(stderr);
          std::_Exit(124);
        }
      }
    }).detach();
  });
}

// A persistent OS thread that runs the clusters handed to it, one at a time, with a small
// stack of its own (it runs only the cluster's scheduler; the fibers have their own stacks).
// Cluster c (a block, without clusters) runs on worker c % kWorkers with the stack set of
// that worker: its thread_local __shared__ variables (ThreadSanitizer build) and its fibers'
// stacks are then never memory that another worker's fibers touched.
class BlockWorker {
 public:
  BlockWorker() {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, std::size_t{1} << 20);
    void* (*start)(void*) = [](void* self) -> void* {
      static_cast<BlockWorker*>(self)->loop();
      return nullptr;
    };
    const int rc = pthread_create(&thread_, &attr, start, this);
    pthread_attr_destroy(&attr);
    if (rc != 0) throw Error("dspark emulation: cannot start a block worker thread");
    pthread_detach(thread_);
  }

  // Runs job on the worker and waits for it (the mutex orders the two, as a launch does).
  void run(const std::function<void()>& job) {
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = &job;
    changed_.notify_all();
    changed_.wait(lock, [this] { return job_ == nullptr; });
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      changed_.wait(lock, [this] { return job_ != nullptr; });
      (*job_)();
      job_ = nullptr;
      changed_.notify_all();
    }
  }

  pthread_t thread_;
  std::mutex mutex_;
  std::condition_variable changed_;
  const std::function<void()>* job_ = nullptr;
};

// A block's dynamic shared memory: exactly `bytes` from the allocator (AddressSanitizer
// reports an access past the end), 16-byte aligned, garbage. Allocated by the scheduler
// under ThreadSanitizer's ignores: new memory for it, with no history of an earlier block's
// memory at the same address.
void allocate_dynamic_shared(Block& block, std::size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, 16, bytes) != 0)
    throw Error("dspark emulation: cannot allocate " + std::to_string(bytes) + " bytes of dynamic shared memory");
  if (p) std::memset(p, kSharedGarbage, bytes);
  block.dynamic_shared = static_cast<unsigned char*>(p);
}

void free_dynamic_shared(Cluster& cluster) {
  for (Block& block : cluster.blocks) {
    if (block.dynamic_shared && __asan_unpoison_memory_region)
      __asan_unpoison_memory_region(block.dynamic_shared, cluster.dynamic_shared_bytes);
    std::free(block.dynamic_shared);
    block.dynamic_shared = nullptr;
  }
}

// All threads of `block` have finished: on a GPU its shared memory is gone (another block
// of the cluster reading it now reads undefined values). AddressSanitizer reports such a
// read from now on.
void block_exited(const Cluster& cluster, const Block& block) {
  if (block.dynamic_shared && __asan_poison_memory_region)
    __asan_poison_memory_region(block.dynamic_shared, cluster.dynamic_shared_bytes);
}

void run_cluster(Cluster& cluster, const std::function<void()>& body) {
  reset_shared_memory();
  struct FreeDynamicShared {
    Cluster& cluster;
    ~FreeDynamicShared() { free_dynamic_shared(cluster); }
  } free_at_end{cluster};
  for (Block& block : cluster.blocks) allocate_dynamic_shared(block, cluster.dynamic_shared_bytes);
  if (__tsan_release) __tsan_release(&block_start_token);
  for (Block& block : cluster.blocks) {
    block.running = block.num_threads;
    for (Fiber& f : block.fibers) {
      // A finished fiber never returns from its first frames, whose AddressSanitizer
      // poisoning stays behind near the top of its stack; an abandoned one leaves it anywhere.
      if (__asan_unpoison_memory_region) {
        const std::size_t dirty = f.stack->abandoned ? f.stack->bytes : std::min<std::size_t>(f.stack->bytes, 16384);
        __asan_unpoison_memory_region(f.stack->bottom + f.stack->bytes - dirty, dirty);
      }
      f.stack->abandoned = true;  // until the fiber finishes
      f.context.start(f.stack->bottom, f.stack->bytes, fiber_entry);
      f.state = State::kRunnable;
      if (__tsan_create_fiber) {
        Stack* owner = tsan_thread_per_lane() ? f.stack : f.stack - f.info.lane;  // the warp's lane 0
        if (!owner->tsan_fiber) owner->tsan_fiber = __tsan_create_fiber(0);
        f.tsan_fiber = owner->tsan_fiber;
      }
      f.tsan_ignores = 0;
    }
  }
  tls_cluster = &cluster;
  tls_body = &body;
  const bool clustered = cluster.blocks.size() > 1;
  for (;;) {
    bool ran = false;
    for (Block& block : cluster.blocks) {
      for (Fiber& f : block.fibers) {
        if (f.state != State::kRunnable) continue;
        resume(f);
        ran = true;
        if (f.state == State::kDone && --block.running == 0) block_exited(cluster, block);
        if (!cluster.error.empty()) break;
      }
      if (!cluster.error.empty()) break;
    }
    // Checked every round, before whatever the sharing led to (wrong values, a deadlock).
    if (clustered && static_shared_written()) {
      cluster.error = "static __shared__ memory was written in a launch with clusters of " +
                      std::to_string(cluster.blocks.size()) +
                      " blocks: the emulation has one copy of a static __shared__ variable, not one per block, which "
                      "the blocks of a cluster would share. Keep the shared memory of a cluster kernel (and of the "
                      "functions it calls) in dynamic shared memory (DSPARK_DYNAMIC_SHARED, dspark/cluster.cuh)" +
                      (cluster.error.empty() ? std::string() : "; the cluster then also failed: " + cluster.error);
      cluster.error_block = nullptr;
      break;
    }
    if (!cluster.error.empty()) break;
    if (std::all_of(cluster.blocks.begin(), cluster.blocks.end(), [](const Block& b) { return b.running == 0; })) break;
    if (!ran) {
      cluster.error = deadlock_report(cluster);
      break;
    }
  }
  tls_cluster = nullptr;
  tls_body = nullptr;
  for (Block& block : cluster.blocks)
    for (Fiber& f : block.fibers) {
      if (!f.tsan_fiber) continue;
      if (f.state != State::kDone) {
        // Abandoned (its ignores ended when it switched out): end it as that fiber, so that
        // the launch's return is ordered after its accesses as after those of the others.
        __tsan_switch_to_fiber(f.tsan_fiber, kTsanNoSync);
        if (__tsan_release) {
          __tsan_release(&launch_end_token);
          __tsan_release(&tls_worker_token);
        }
        __tsan_switch_to_fiber(tls_scheduler_tsan_fiber, kTsanNoSync);
      }
      f.tsan_fiber = nullptr;
    }
  if (!cluster.error.empty())
    throw Error("dspark emulation: " + place_string(cluster, cluster.error_block) + ": " + cluster.error);
}

// An Error for a runtime call that only a CUDA thread can make.
void require_kernel(const char* what) {
  if (tls_fiber == nullptr) throw Error(std::string("dspark emulation: ") + what + " called outside a kernel");
}

std::string dim_string(dim3 d) { return index_string(d.x, d.y, d.z); }

}  // namespace

ThreadInfo this_thread() {
  if (current_thread == nullptr) throw Error("dspark emulation: threadIdx/blockIdx read outside a kernel");
  return *current_thread;
}

void run_kernel(const char* kernel_name, dim3 grid, dim3 block_dim, const std::function<void()>& body) {
  run_kernel(kernel_name, grid, block_dim, dim3(1, 1, 1), 0, body);
}

void run_kernel(const char* kernel_name, dim3 grid, dim3 block_dim, dim3 cluster_dim, std::size_t dynamic_shared_bytes,
                const std::function<void()>& body) {
  if (tls_fiber != nullptr) throw Error("dspark emulation: a kernel launch from inside a kernel is not supported");
  const unsigned long long threads = static_cast<unsigned long long>(block_dim.x) * block_dim.y * block_dim.z;
  if (threads == 0 || threads > 1024 || block_dim.z > 64)
    throw Error("dspark emulation: kernel " + std::string(kernel_name) + ": invalid block size " +
                dim_string(block_dim) + "; CUDA allows at most 1024 threads");
  if (grid.y > 65535 || grid.z > 65535 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    throw Error("dspark emulation: kernel " + std::string(kernel_name) + ": invalid grid " + dim_string(grid));
  // The checks of cudaLaunchKernelEx with a cluster dimension (cudaErrorInvalidClusterSize,
  // cudaErrorInvalidValue).
  const unsigned long long cluster_blocks =
      static_cast<unsigned long long>(cluster_dim.x) * cluster_dim.y * cluster_dim.z;
  if (cluster_blocks == 0 || cluster_blocks > kMaxClusterBlocks)
    throw Error("dspark emulation: kernel " + std::string(kernel_name) + ": invalid cluster " +
                dim_string(cluster_dim) + " of " + std::to_string(cluster_blocks) + " blocks; CUDA allows 1 to " +
                std::to_string(kMaxClusterBlocks) + " blocks a cluster (the portable cluster size)");
  if (grid.x % cluster_dim.x != 0 || grid.y % cluster_dim.y != 0 || grid.z % cluster_dim.z != 0)
    throw Error("dspark emulation: kernel " + std::string(kernel_name) + ": grid " + dim_string(grid) +
                " is not a multiple of the cluster " + dim_string(cluster_dim) + " in every dimension");
  if (dynamic_shared_bytes > kMaxDynamicSharedBytes)
    throw Error("dspark emulation: kernel " + std::string(kernel_name) + ": " + std::to_string(dynamic_shared_bytes) +
                " bytes of dynamic shared memory; a block may have at most " + std::to_string(kMaxDynamicSharedBytes) +
                " (227 KiB, sm_90)");
  // One launch at a time (a launch on a stream is synchronous here anyway).
  static std::mutex launch_mutex;
  const std::lock_guard<std::mutex> lock(launch_mutex);
  // Under ThreadSanitizer two workers (see StackPool), otherwise one.
  static const unsigned num_workers = __tsan_switch_to_fiber ? kTsanWorkers : 1;
  static StackPool stacks(stack_bytes(), num_workers);
  // Never destroyed: at exit a worker still waits on its condition variable.
  static auto& workers = *new std::vector<std::unique_ptr<BlockWorker>>();
  const TsanIgnore ignore;
  while (workers.size() < num_workers) workers.push_back(std::make_unique<BlockWorker>());

  start_watchdog();
  watchdog_kernel.store(kernel_name);
  watchdog_cluster_dims[0].store(cluster_blocks > 1 ? cluster_dim.x : 0);
  watchdog_cluster_dims[1].store(cluster_dim.y);
  watchdog_cluster_dims[2].store(cluster_dim.z);
  watchdog_deadline_ns.store(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                 std::chrono::steady_clock::now().time_since_epoch()).count() +
                             static_cast<long long>(time_limit_seconds()) * 1000000000LL);
  struct DisarmWatchdog {
    ~DisarmWatchdog() { watchdog_deadline_ns.store(0); }
  } disarm;

  const unsigned num_threads = static_cast<unsigned>(threads);
  const unsigned num_blocks = static_cast<unsigned>(cluster_blocks);
  unsigned long long cluster_number = 0;
  for (unsigned z = 0; z < grid.z / cluster_dim.z; ++z)
    for (unsigned y = 0; y < grid.y / cluster_dim.y; ++y)
      for (unsigned x = 0; x < grid.x / cluster_dim.x; ++x, ++cluster_number) {
        const unsigned worker = static_cast<unsigned>(cluster_number % num_workers);
        Cluster cluster;
        cluster.kernel_name = kernel_name;
        cluster.index = uint3{x, y, z};
        cluster.dims = cluster_dim;
        cluster.num_threads = static_cast<int>(num_threads * num_blocks);
        cluster.dynamic_shared_bytes = dynamic_shared_bytes;
        cluster.meetings.init(1, num_threads * num_blocks);
        cluster.blocks.resize(num_blocks);
        unsigned rank = 0;
        for (unsigned rz = 0; rz < cluster_dim.z; ++rz)
          for (unsigned ry = 0; ry < cluster_dim.y; ++ry)
            for (unsigned rx = 0; rx < cluster_dim.x; ++rx, ++rank) {
              Block& block = cluster.blocks[rank];
              block.cluster = &cluster;
              block.rank = rank;
              block.index = uint3{x * cluster_dim.x + rx, y * cluster_dim.y + ry, z * cluster_dim.z + rz};
              block.num_threads = num_threads;
              block.fibers.resize(num_threads);
              block.warp_meetings.resize((num_threads + 31) / 32);
              for (auto& open : block.warp_meetings) open.reserve(32);
              block.meetings.init(block.warp_meetings.size() + 1, num_threads);  // a pool per warp, and the barrier's
              unsigned linear = 0;
              for (unsigned tz = 0; tz < block_dim.z; ++tz)
                for (unsigned ty = 0; ty < block_dim.y; ++ty)
                  for (unsigned tx = 0; tx < block_dim.x; ++tx, ++linear) {
                    Fiber& f = block.fibers[linear];
                    f.info = ThreadInfo{uint3{tx, ty, tz}, block.index, block_dim, grid,
                                        linear, linear / 32, linear % 32};
                    f.block = &block;
                    f.stack = stacks.stack(worker, rank * num_threads + linear);
                  }
            }
        std::exception_ptr failure;
        workers[worker]->run([&] {
          const TsanIgnore ignore_worker;
          tls_scheduler_tsan_fiber = __tsan_get_current_fiber ? __tsan_get_current_fiber() : nullptr;
          try {
            run_cluster(cluster, body);
          } catch (...) {
            failure = std::current_exception();
          }
        });
        if (failure) {
          if (__tsan_acquire) __tsan_acquire(&launch_end_token);
          stacks.end_tsan_threads();
          std::rethrow_exception(failure);
        }
      }
  if (__tsan_acquire) __tsan_acquire(&launch_end_token);
  stacks.end_tsan_threads();
}

// A barrier of all `count` threads of a block (__syncthreads) or cluster (cluster_sync):
// `pending` is the group's barrier in progress (null when none), `pool` its meeting pool.
// Arrival releases and departure acquires for ThreadSanitizer, as the hardware barrier
// orders memory.
void meet_at_barrier(Meeting*& pending, MeetingPools& meetings, unsigned pool, const char* what, const char* group, int count,
             Location where) {
  Fiber& self = *tls_fiber;
  if (!pending) {
    pending = meetings.get(pool, what, /*barrier=*/true, 0, where, 0, count);
  } else if (!same_location(pending->where, where)) {
    DSPARK_FAIL_HERE(std::string(what) + " at " + where_string(where) + " while other threads of the " + group +
                     " wait at " + what + " at " + where_string(pending->where) + " (divergent barrier)");
  }
  Meeting* meeting = pending;
  if (__tsan_release) __tsan_release(meeting);
  if (++meeting->arrived == count) {
    pending = nullptr;
    complete(*meeting);
  } else {
    wait_in(*meeting, self);
  }
  if (__tsan_acquire) __tsan_acquire(meeting);
  meetings.leave(meeting);
}

void syncthreads(Location where) {
  Block& block = *tls_block;
  meet_at_barrier(block.barrier, block.meetings, static_cast<unsigned>(block.warp_meetings.size()), "__syncthreads", "block",
          static_cast<int>(block.num_threads), where);
}

void cluster_sync(Location where) {
  require_kernel("cluster_sync");
  Cluster& cluster = *tls_cluster;
  meet_at_barrier(cluster.barrier, cluster.meetings, 0, "cluster_sync", "cluster", cluster.num_threads, where);
}

void* dynamic_shared_memory() {
  require_kernel("dynamic_shared_memory");
  return tls_block->dynamic_shared;
}

unsigned cluster_block_rank() {
  require_kernel("cluster_block_rank");
  return tls_block->rank;
}

dim3 cluster_dims() {
  require_kernel("cluster_dims");
  return tls_cluster->dims;
}

void* map_shared_rank(const void* address, unsigned rank, Location where) {
  require_kernel("map_shared_rank");
  const Block& block = *tls_block;
  const Cluster& cluster = *tls_cluster;
  const std::size_t bytes = cluster.dynamic_shared_bytes;
  const uintptr_t base = reinterpret_cast<uintptr_t>(block.dynamic_shared);
  const uintptr_t p = reinterpret_cast<uintptr_t>(address);
  // (One past the end is an address of the memory too, as for any C++ array.)
  if (block.dynamic_shared == nullptr || p < base || p > base + bytes) {
    char text[160];
    std::snprintf(text, sizeof(text), ": address %p is not in the block's dynamic shared memory (%zu bytes at %p)",
                  address, bytes, static_cast<const void*>(block.dynamic_shared));
    DSPARK_FAIL_HERE("map_shared_rank at " + where_string(where) + text +
                     ": the emulation maps only dynamic shared memory (DSPARK_DYNAMIC_SHARED); a static __shared__ "
                     "variable is not per block in a cluster here");
  }
  if (rank >= cluster.blocks.size())
    DSPARK_FAIL_HERE("map_shared_rank at " + where_string(where) + ": rank " +
                     (rank > 0x7FFFFFFFu ? std::to_string(static_cast<int>(rank)) : std::to_string(rank)) +
                     ", but the cluster has " + std::to_string(cluster.blocks.size()) + " blocks");
  return cluster.blocks[rank].dynamic_shared + (p - base);
}

unsigned query_shared_rank(const void* address, Location where) {
  require_kernel("query_shared_rank");
  const Cluster& cluster = *tls_cluster;
  const uintptr_t p = reinterpret_cast<uintptr_t>(address);
  for (const Block& block : cluster.blocks) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(block.dynamic_shared);
    if (block.dynamic_shared != nullptr && p >= base && p < base + cluster.dynamic_shared_bytes) return block.rank;
  }
  char text[96];
  std::snprintf(text, sizeof(text), ": address %p", address);
  DSPARK_FAIL_HERE("query_shared_rank at " + where_string(where) + text +
                   " is not in the dynamic shared memory of a block of the cluster (the emulation knows only dynamic "
                   "shared memory there)");
}

void warp_exchange(const char* what, unsigned mask, const void* mine, std::size_t bytes, void* all,
                   bool orders_memory, Location where) {
  Block& block = *tls_block;
  Fiber& self = *tls_fiber;
  const unsigned warp = self.info.warp, lane = self.info.lane;
  if (bytes > kMaxExchangeBytes) DSPARK_FAIL_HERE(std::string(what) + ": value too large for the emulation");
  const unsigned first_thread = warp * 32;
  const unsigned lanes_in_warp = std::min(32u, block.num_threads - first_thread);
  const unsigned existing = lanes_in_warp == 32 ? 0xFFFFFFFFu : (1u << lanes_in_warp) - 1u;
  if ((mask & ~existing) != 0u)
    DSPARK_FAIL_HERE(std::string(what) + " at " + where_string(where) + ": mask " + hex(mask) +
              " names lanes that do not exist in this block's last warp (" + std::to_string(lanes_in_warp) +
              " lanes): they never arrive");
  // Lanes of a warp may be at several collectives at once: disjoint groups at the same place
  // (each with its own mask, as after __match_any_sync), and lanes that have left a
  // group's collective waiting at a later one for lanes still on their way. This lane joins
  // the open meeting of this very collective (what, mask, place) if there is one. Another
  // open meeting that expects this lane while lanes of this lane's mask wait in it can
  // never complete (they wait for this lane, this lane for them): lanes at different
  // collectives, or with different masks, reported here rather than as a deadlock.
  auto& open = block.warp_meetings[warp];
  Meeting* meeting = nullptr;
  for (Meeting* m : open) {
    if (m->mask == mask && std::strcmp(m->what, what) == 0 && same_location(m->where, where) && m->bytes == bytes) {
      meeting = m;
    } else if (((m->mask >> lane) & 1u) != 0u && (m->arrived_lanes & mask) != 0u) {
      DSPARK_FAIL_HERE(std::string(what) + "(mask " + hex(mask) + ") at " + where_string(where) + " while lanes " +
                hex(m->arrived_lanes) + " of the warp wait at " + m->what + "(mask " + hex(m->mask) + ") at " +
                where_string(m->where) + " (lanes must meet at the same collective with the same mask)");
    }
  }
  if (!meeting) {
    meeting = block.meetings.get(warp, what, /*barrier=*/false, mask, where, bytes, __builtin_popcount(mask));
    open.push_back(meeting);
  }
  if (meeting->arrived_lanes & (1u << lane)) DSPARK_FAIL_HERE(std::string(what) + ": lane arrived twice");
  copy_bytes(meeting->values + lane * bytes, mine, bytes);
  meeting->arrived_lanes |= 1u << lane;
  if (orders_memory && __tsan_release) __tsan_release(meeting);
  if (meeting->arrived_lanes == mask) {
    *std::find(open.begin(), open.end(), meeting) = open.back();  // no memmove (an intercepted call)
    open.pop_back();
    complete(*meeting);
  } else {
    wait_in(*meeting, self);
  }
  if (bytes)
    for (unsigned l = 0; l < 32; ++l)
      if ((mask >> l) & 1u) copy_bytes(static_cast<unsigned char*>(all) + l * bytes, meeting->values + l * bytes, bytes);
  if (orders_memory && __tsan_acquire) __tsan_acquire(meeting);
  block.meetings.leave(meeting);
}

char fence_token;  // ThreadSanitizer's sync object of __threadfence

void thread_fence() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (__tsan_release) {
    __tsan_release(&fence_token);
    __tsan_acquire(&fence_token);
  }
}

void fail(const std::string& message, Location where) {
  // (the message was built by the caller, which is the kernel's business)
  if (tls_fiber == nullptr) throw Error("dspark emulation: " + message + " at " + where_string(where));
  tsan_ignore_begin();
  fail_here(message + " at " + where_string(where));
}

}  // namespace dspark::emulate
