// Thread-block clusters (sm_90) in the dspark kernels, for nvcc and for the CUDA emulation
// (include/dspark/emulate; there include dspark/emulate/device.h before this header).
//
// A kernel launched in clusters of more than one block keeps its shared memory in dynamic
// shared memory: the emulation has one copy of a static __shared__ variable, not one per
// block, which the blocks of a cluster would share (runtime.h), and maps only dynamic shared
// memory to other blocks (cooperative_groups::cluster_group::map_shared_rank).
#pragma once

// The block's dynamic shared memory (the launch's dynamic shared bytes, 16-byte aligned), as
// a pointer `type* name`; a statement inside a kernel or device function.
#ifdef DSPARK_EMULATE
#define DSPARK_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::dspark::emulate::dynamic_shared_memory())
#else
#define DSPARK_DYNAMIC_SHARED(type, name)                                  \
  extern __shared__ __align__(16) unsigned char dspark_dynamic_shared_[]; \
  type* name = reinterpret_cast<type*>(dspark_dynamic_shared_)
#endif
