"""The discrete-event simulator: the scheduler's own dispatcher, routers, scalers, predictors and
workflow engine, driven by a simulated clock over emulated replicas."""
