"""The models every stage loads: the packaged MiniLM encoder and the classifier student.

`encoders`: MiniLM sentence embeddings, the embedding-classifier demo teacher, and the
one mean-pool / linear-head / softmax shared by everything that classifies.
`classifier`: `ClassifierStudent`, the student as evaluation, serving and the teacher
server load it (tokenize, forward, softmax).
"""
