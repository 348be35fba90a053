"""The training loop: the Trainer (owns every stateful part), its checkpoint registry, the step."""
