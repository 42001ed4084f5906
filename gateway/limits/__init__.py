"""Quotas, bandwidth and concurrency: no module fills a destination or starves the others."""
