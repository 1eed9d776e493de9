"""spillgate.admission: the Admission service and its I/O edges.

signals  scrape replicas' Prometheus endpoints into core Signals (one mapping table per
         backend kind: triton, triton-vllm, triton-trtllm, simulator); `Scraper`
health   ServerLive / ModelReady polling and canary inferences, reported as events;
         `HealthChecker` (the circuit breaker that consumes them lives in core)
"""
