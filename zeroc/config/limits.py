"""Bounds of the sampling parameters that the gateway checks as well as `zeroc.sampling.SamplingParams`: here, in the
config layer, so the gateway's process checks them without importing torch (some 230 MB of its memory)."""

MAX_LOGPROBS = 20  # alternatives per position a request may ask log-probabilities of (OpenAI's chat limit; vLLM's)
MAX_PENALTY = 2.0  # |frequency_penalty| and |presence_penalty|, OpenAI's range
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for each entry of logit_bias
MAX_LOGIT_BIAS_TOKENS = 300
MAX_STOP_TOKEN_IDS = 256
MAX_GUIDE_CHARS = 65536  # a structured-output guide's JSON schema, regex, grammar or choices (zeroc.sampling.Guide)
MAX_GUIDE_CHOICES = 256  # a choice guide's strings, each at most MAX_GUIDE_CHOICE_CHARS
MAX_GUIDE_CHOICE_CHARS = 1024
MAX_GUIDE_AFTER_CHARS = 64  # a guide's `after` marker: one token's text
# A JSON Schema guide's shape: xgrammar's compile time grows about with the cube of both (measured on this CPU: 500
# nested levels took 7 s and 1,000 took 50; an object of 1,000 properties 1.6 s and 2,000 15 s), and clients
# choose the schemas. Real schemas stay far below.
MAX_GUIDE_DEPTH = 64  # nested objects and arrays of the schema document
MAX_GUIDE_PROPERTIES = 256  # properties of one object schema
