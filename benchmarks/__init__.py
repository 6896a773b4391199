"""The benchmark suite: ``python -m benchmarks`` / ``nextword-bench`` (not part of the unit tests).

It starts what it needs itself (uvicorn on the model under test, redis, load-generator
processes), measures every figure as a median over repeats after warm-up, and reports each
comparison as a ratio of two things measured in the same run on the same weights, with its target
and ✅/❌. Sections (``--only``):

* ``runtime``  — onnxruntime vs torch eager (step at batch 1 and 64, 64-token prompt), int8 vs fp32
* ``roofline`` — achieved GFLOP/s of a batch-64 step vs numpy sgemm on the decoder's shape
* ``http``     — dynamic batching under load: 1/8/64 clients, batching on vs off
* ``overhead`` — service throughput vs raw onnxruntime at the formed batch size; HTTP overhead in ms
* ``sessions`` — one-word session updates after 10 vs 2,000 words, HTTP and WebSocket, redis store
* ``capacity`` — keystrokes per CPU-second (service and redis), redis commands/bytes per keystroke,
  redis memory per session, resident memory per loaded model version (docs/scaling.md)
* ``prompt``   — stateless predict on 1/64/512-word prompts, cost per prompt word
* ``training`` — tokens/s of the trainer's step vs a minimal nn.LSTM loop, and of every cell
* ``keyboard`` — simulated typists on WebSocket sessions (one character per message, open loop):
  typists served at p99 ≤ 50 ms with the keystroke fast path vs without it, and by the stack
  alone answering with no work (``benchmarks/floor_app.py``); prefix selection cost
* ``suggest``  — typo-tolerant completion: accuracy and cost (``benchmarks/suggest.py``)
* ``soak``     — 64 clients of mixed requests for 60 s: no errors, and no growth of the server's
  resident memory from the first half to the second

Results: a Markdown table on stdout, ``bench-results/latest.json``, and with ``--readme`` the
README's table between ``<!-- bench:start -->`` and ``<!-- bench:end -->``.
"""
