"""Pipeline glue below the Prefect flow: stage helpers, presets and the run lock, sweeps, the
local stack (serve) and the multi-node launcher."""
