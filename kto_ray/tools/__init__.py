"""Around the two stages: evaluate, report, the memory planner, the one-session pipeline and the demo."""
