"""Loss functions per model kind and (with the training issue) the shared train step and loop."""
