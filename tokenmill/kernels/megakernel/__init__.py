"""A whole Llama decode step in one persistent CUDA kernel (sm_90a): schedule.py plans it, build.py compiles and
launches it, decoder.py is the engine backend (`--decode-backend megakernel`)."""
