"""HTTP routers: prediction/scoring, model management, health and metrics."""
