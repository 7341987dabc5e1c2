"""The one set of defaults: `slicemoe run`, `trace`, `sim` and `plan`, `Model` and `trace.replay`
take every cache-policy and context default from here, and the C API's `*_default_params()` give
the same values (tests/test_hostile.py holds them together). A flag therefore means the same thing
everywhere: a trace recorded with some flags and replayed with the same flags reproduces the
counters of `slicemoe run --json` with those flags.
"""

from __future__ import annotations

# context
N_CTX = 2048            # tokens
N_BATCH = 512           # prompt tokens per llama_decode call
N_THREADS = 0           # 0 = one per fast core (every core where they are alike)
N_PREDICT = 32          # tokens to decode

# slice cache
POLICY = "dbsc"         # SliceMoE's bit-sliced cache with precision per use
PRECISION = "auto"      # per use by the policy (high without a cache)
WARMUP = "pcw"          # SliceMoE's prefill-time cache warm-up
HIGH_THRESHOLD = 0.25   # auto precision: a use runs at 8 bits if its routing weight >= this
MAX_MISS_RATE = 0.0     # 0 = a fixed threshold
MSB_SHARE = 0.0         # 0 = dbsc's adaptive split (two thirds for MSB slots in hobbit, dymoe, cache_prior)
HIGH_RATIO = 0.0        # dymoe: 0 = 0.5
PRIOR_LAMBDA = 0.5      # cache_prior: bias of a cached expert's logit, in mean logit ranges
GATING_T = 0.04         # adapmoe: a use after the first is dropped when its weight < sqrt(T) = 0.2
LSB_BACKGROUND = False  # an 8-bit use whose LSB slice misses waits for it (True: with its MSB slice resident, runs at 4 bits, the LSB read for the next token)
PREFETCH = False        # look-ahead prefetch (see docs/design.md for why it is off)
LOW_PRECISION_PROMPT = False  # a prompt's expert products at 8 bits (True: MSB slices only, half the bytes)
IO_MODE = "auto"        # misses read with O_DIRECT where the file system has it, else buffered

# slicemoe serve
MAX_QUEUE = 16          # requests that may wait for the model; more get a 503
MAX_WAIT_S = 300.0      # the longest a request waits for the model before a 503
RELEASE_IDLE_S = 0.0    # serve: release the pools after this long without a request (0: never)

# the values of the policy settings above, by name, as Model, replay and the CLI take them
CACHE_SETTINGS = {
    "policy": POLICY, "precision": PRECISION, "warmup": WARMUP, "high_threshold": HIGH_THRESHOLD,
    "max_miss_rate": MAX_MISS_RATE, "msb_share": MSB_SHARE, "high_ratio": HIGH_RATIO,
    "prior_lambda": PRIOR_LAMBDA, "gating_t": GATING_T, "lsb_background": LSB_BACKGROUND,
}
