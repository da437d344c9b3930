"""Where another library is taught about this project's classes beyond its public registration APIs: diffusers'
pipeline loading (`diffusers`), `transformers serve` (`transformers_serve`, imported by `viscpm-serve` only) and the
Hub kernels transformers 5.25 fetches by default (`hub_kernels`)."""
