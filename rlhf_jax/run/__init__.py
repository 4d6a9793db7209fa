"""The driver library: the command line and its checks at the door (`run.cli`), models between
stages (`run.handover`), the resumable training loop (`run.runner.fit`) and its metrics files
(`run.metrics_writer`)."""
