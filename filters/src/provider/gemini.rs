//! Google Gemini and Vertex AI (generateContent / streamGenerateContent). Being written.
