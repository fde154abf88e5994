"""Protocol shared by the aggregator and the edge nodes: topics, messages, codec, MQTT adapter."""
