"""`kvggml bench`: stock llama.cpp's cache types against kvggml's settings, on one model and one text.

`variants` (what is compared), `probe` (measurements inside libllama, in processes of their own),
`measure` (one cell: memory, speed, quality or recall of one variant), `store` (the results file,
cell by cell, for resuming), `report` (tables and plots), `run` (checks, plan, progress).
"""
