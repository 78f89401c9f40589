package natsstore

import "time"

// SetNameQuestionTimeout sets TakeName's question timeout until the
// returned restore is called (tests that must tell an answer from a
// timeout; not for parallel tests).
func SetNameQuestionTimeout(d time.Duration) (restore func()) {
	old := nameQuestionTimeout
	nameQuestionTimeout = d
	return func() { nameQuestionTimeout = old }
}
