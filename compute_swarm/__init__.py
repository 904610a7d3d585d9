"""compute-swarm: a marketplace that turns idle gaming GPUs into a LoRA fine-tuning and inference cloud.

The parts are subpackages: `sdk` (buyers), `coordinator` (the service), `desktop` (sellers' node agent
and tray app), `engine` (runs one job) and `kernels` (attention). `protocol` is the node ⇄ coordinator
wire, `sweeps` the sweep spec and `invitation` what a downloaded app carries to join its swarm; all are
light, for every part to share. Nothing is imported here.
"""
