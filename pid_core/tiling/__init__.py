"""Tiled decoding: any output size inside a memory budget, every tile inside the trained range.

PiD attends over the whole canvas: 16x the attention work of 2K at 4K, 256x at 8K, and the models
drift beyond the sizes they were trained on. Tiling is a *velocity function over the canvas*, so the
sampler does not change; all tiles share one state and one noise field at every step (docs/DESIGN.md §9).

  geometry   where the tiles lie and how much each counts at each pixel
  fusion     the tiles' velocities fused into the canvas, streamed through a band of rows
  memory     working memory of a forward, the sampler's state, the free budget of a device
  policy     the tile size and tiles per forward for a canvas, a checkpoint and a budget
"""

from .fusion import TiledVelocity
from .geometry import Tile, plan_tiles
from .memory import device_memory_budget
from .policy import TileOptions, TilePlan, plan_tiling

__all__ = ["Tile", "TileOptions", "TilePlan", "TiledVelocity", "device_memory_budget", "plan_tiles", "plan_tiling"]
