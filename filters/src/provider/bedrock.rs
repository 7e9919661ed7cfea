//! Amazon Bedrock (Converse / ConverseStream, SigV4, AWS event-stream framing). Being written.
