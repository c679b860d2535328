// The runtime of the CUDA emulation: runs a kernel's blocks on the CPU, one fiber per CUDA
// thread, and implements the points where CUDA threads meet (block barrier, warp
// collectives). Implemented in csrc/emulate/runtime.cpp; device.h turns CUDA syntax into
// calls of these functions.
//
// Model:
//  * Blocks run one after another, on block-worker OS threads. Inside a block every CUDA thread
//    is a fiber (its own stack); a fiber runs until it reaches a barrier or a warp collective
//    that not all its participants have reached, then the next runnable fiber runs. So a
//    barrier or shuffle has its real meaning: nobody passes it until everybody it waits for
//    has arrived with their values.
//  * Thread-block clusters (sm_90, run_kernel with a cluster shape): the blocks of a cluster
//    run together, their threads all fibers of one scheduler, one cluster after another (a
//    launch without clusters is one of clusters of one block). __syncthreads still waits for
//    the block only; cluster_sync waits for the whole cluster. Each block has its own dynamic
//    shared memory, which the blocks of the cluster reach through map_shared_rank
//    (distributed shared memory).
//  * A barrier or collective that can never complete (a thread exited, or waits somewhere
//    else) is a deadlock on a GPU. Here it is reported at once, as an Error naming the kernel,
//    the cluster and block, and where each thread waits; so is a kernel that runs past a time
//    limit. A thread that spins on a flag another thread sets never yields: on a GPU the
//    blocks of a cluster (and the warps of a block) run concurrently and such a wait ends,
//    here it runs into the time limit. Wait at barriers instead.
//  * Under ThreadSanitizer each fiber is a TSan fiber. Only __syncthreads, __syncwarp and
//    cluster_sync order memory between threads (as in CUDA's memory model); shuffles and
//    votes exchange values but order nothing, and blocks of a launch are unordered with
//    respect to each other (except at cluster_sync, within a cluster). A missing barrier
//    between a shared-memory write and a read of another thread is then a data race that
//    TSan reports.
//  * Static __shared__ variables (device.h) are one copy per block worker, not per block:
//    the blocks of a cluster would share it. A kernel launched with clusters of more than one
//    block must keep its shared memory in dynamic shared memory (DSPARK_DYNAMIC_SHARED,
//    dspark/cluster.cuh), and so must everything it calls (dspark::block_allreduce without a
//    scratch argument, for one, has a static __shared__ array). Outside the ThreadSanitizer
//    build a write to static __shared__ memory during such a launch is an Error (the runtime
//    looks after every round of the scheduler); under ThreadSanitizer the blocks' unordered
//    accesses to the one copy are usually reported as data races.
#pragma once

#include <vector_types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>

namespace dspark::emulate {

// Source position of a barrier or collective: threads of a block must meet at the same one.
struct Location {
  const char* file;
  int line;
};

#define DSPARK_EMULATE_HERE (::dspark::emulate::Location{__FILE__, __LINE__})

// What threadIdx, blockIdx, blockDim and gridDim read for the running CUDA thread.
struct ThreadInfo {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned linear;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  unsigned warp;    // linear / 32
  unsigned lane;    // linear % 32
};

// The CUDA thread running now, as a copy: kernel code never touches the runtime's memory
// (for ThreadSanitizer it is the runtime's business). A function, not a thread_local
// variable read inline: an optimising compiler may keep a thread_local's value across the
// fiber switches inside a barrier call, which it takes for an ordinary function call.
ThreadInfo this_thread();

// A kernel that could not run to the end: deadlock, divergent barrier, bad collective,
// time limit. The message names the kernel and the block.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Runs body once per CUDA thread of every block of grid x block. Throws Error.
void run_kernel(const char* kernel_name, dim3 grid, dim3 block, const std::function<void()>& body);

// CUDA's launch limits for clusters and dynamic shared memory on sm_90: at most 8 blocks a
// cluster (the portable size; the non-portable 16 needs an opt-in the emulation does not
// model) and 227 KiB of dynamic shared memory a block (the opt-in maximum).
constexpr unsigned kMaxClusterBlocks = 8;
constexpr std::size_t kMaxDynamicSharedBytes = 232448;

// The same in thread-block clusters of shape `cluster` (each grid dimension a multiple of
// the cluster's), every block with dynamic_shared_bytes of dynamic shared memory, as
// cudaLaunchKernelEx with a cluster-dimension attribute does. Throws Error, also for a
// launch CUDA refuses (grid not divisible by the cluster, more than 8 blocks a cluster,
// more than 227 KiB of dynamic shared memory).
void run_kernel(const char* kernel_name, dim3 grid, dim3 block, dim3 cluster, std::size_t dynamic_shared_bytes,
                const std::function<void()>& body);

// __syncthreads(): waits until every thread of the block has reached this barrier.
void syncthreads(Location where);

// cluster.sync() (barrier.cluster.arrive + barrier.cluster.wait): waits until every thread
// of the cluster has reached this barrier. It orders memory among the cluster's threads
// (shared memory of every block of the cluster, global memory), as __syncthreads does
// among the block's. Without clusters it is the block's barrier (a cluster of one).
void cluster_sync(Location where);

// The calling block's dynamic shared memory: dynamic_shared_bytes of run_kernel, 16-byte
// aligned, 0xFF garbage at the start of the block, its own memory for every block. Under
// AddressSanitizer an access past its end is reported, and so is one to a block's memory
// after all that block's threads have exited (from another block of the cluster: undefined
// on a GPU; a kernel ends with a cluster_sync after its last remote access).
void* dynamic_shared_memory();

// Rank of the calling block in its cluster: x + cx * (y + cy * z) for its index within the
// cluster (blockIdx modulo the cluster's shape cx x cy x cz); 0 without clusters.
unsigned cluster_block_rank();
// The cluster's shape in blocks; (1,1,1) without clusters.
dim3 cluster_dims();

// Distributed shared memory: the address at the same offset in the dynamic shared memory of
// the block of rank `rank` of the caller's cluster. `address` must lie in the caller's own
// dynamic shared memory: static __shared__ variables are not per block in a cluster here
// (see above), so they cannot be mapped. A bad address or rank is an Error.
void* map_shared_rank(const void* address, unsigned rank, Location where);
// The rank of the block whose dynamic shared memory holds `address` (any block of the
// caller's cluster); else an Error.
unsigned query_shared_rank(const void* address, Location where);

// The one warp collective everything else is built on: the lanes named in mask (the
// caller among them) meet at `where`, each contributing `bytes` bytes; when all have
// arrived, each gets all contributions, lane l's at all + l * bytes (lanes outside the
// mask left untouched). `what` names the operation in error messages; lanes must agree on
// it, on the mask and on the location. Lanes of one warp may meet in several collectives at
// once: disjoint masks at the same place, or lanes that went on to a later collective while
// others still meet at an earlier one. With orders_memory (__syncwarp) the meeting also
// orders the lanes' memory accesses, as a barrier does.
void warp_exchange(const char* what, unsigned mask, const void* mine, std::size_t bytes, void* all,
                   bool orders_memory, Location where);

// Reports a misuse found by device.h (for example a lane outside its own mask) as an Error
// of the running kernel.
[[noreturn]] void fail(const std::string& message, Location where);

}  // namespace dspark::emulate
