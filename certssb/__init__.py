"""certssb: certified backdoor defense by sample-specific randomized smoothing (public API is wired at the end)."""
