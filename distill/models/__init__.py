"""The models every stage loads: the packaged MiniLM encoder and the classifier student.

`encoders`: MiniLM sentence embeddings, the embedding-classifier demo teacher, and the
one mean-pool / linear-head / softmax shared by everything that classifies.
`classifier`: `ClassifierStudent`, the student as evaluation, serving and the teacher
server load it (tokenize, forward, softmax).
`causal`: `GenerativeStudent`, a causal LM (full, merged or LoRA adapter) answering chats.
`decoder`: the packaged MiniLM as a causal-LM student.
`export`: a causal-LM student for vLLM: a LoRA adapter in its `--enable-lora` layout, or a
speculative-decoding draft for a teacher with the same tokenizer.
"""
