"""Cloud adapters. Only modules under here (and ``ringfence.store`` adapters) import cloud SDKs."""
