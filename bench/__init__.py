"""Side-by-side benchmarks. Each scenario module exposes ``main(quick: bool) -> str`` returning markdown."""
