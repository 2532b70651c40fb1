// Emulated cooperative groups (see cuda_runtime.h): only the grid barrier.
#pragma once
#include "cuda_runtime.h"

namespace cooperative_groups {
struct grid_group {
  void sync() const { emu::barrier(emu::kGrid); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups
