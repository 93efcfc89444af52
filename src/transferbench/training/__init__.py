"""Fine-tuning: the pure loop (loop.py), data cache (data.py), metrics, tracking, Ray Train wrapper."""
