"""Training a method: the loop (`loop`), the train state at the start (`state`), the
workdir's records (`records`), checkpoints, signals and the lock, evaluating a state
(`evaluation`), writing a trained model (`export`), and every config's shared fields and
validation (`config_base`)."""
