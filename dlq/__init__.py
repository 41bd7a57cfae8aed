"""DLQ tooling (`sink-dlq`): inspect the sink's dead letter queue and replay it through the sink's
own decode and writer.  Imports `sink`; `sink` never imports `dlq`."""
