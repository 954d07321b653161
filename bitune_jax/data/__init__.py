"""Data: scikit-learn digits transfer task (`digits`) and step-indexed numpy batches (`batches`)."""
