"""Self-supervised DINOv2 training: schedules and optimiser parameter groups (`schedules`)."""
