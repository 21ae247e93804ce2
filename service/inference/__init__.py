"""One conversation end to end: transcript (or speech recognition) + media -> features -> bundle ->
fused distribution + face/voice readings. Calls service.features, service.media and models; never
imports service.api or service.jobs."""
