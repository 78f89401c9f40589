package proxy

import (
	"context"
	"errors"
	"fmt"

	"github.com/valyala/fasthttp"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// ErrServerClosed is returned by the Serve methods after Shutdown.
var ErrServerClosed = errors.New("proxy: server closed")

// Client-visible error codes (the "code" of the error body).
const (
	CodeValidation       = "validation"
	CodeNotFound         = "not_found"
	CodeMethodNotAllowed = "method_not_allowed"
	CodeConflict         = "conflict"
	CodeTooLarge         = "too_large"
	CodeUnavailable      = "unavailable"
	CodeInternal         = "internal"
	CodeUnauthorized     = "unauthorized"
)

// httpError is an error the HTTP layer itself answers (routing, auth,
// limits) with a fixed status and code.
type httpError struct {
	status int
	code   string
	msg    string
}

func (e *httpError) Error() string { return e.msg }

func errNotFound(format string, args ...any) error {
	return &httpError{fasthttp.StatusNotFound, CodeNotFound, fmt.Sprintf(format, args...)}
}

func errUnavailable(msg string) error {
	return &httpError{fasthttp.StatusServiceUnavailable, CodeUnavailable, msg}
}

// classify maps an error to its HTTP status and stable code (one table for
// every endpoint; engine errors by errors.Is).
func classify(err error) (int, string) {
	var he *httpError
	switch {
	case errors.As(err, &he):
		return he.status, he.code
	case errors.Is(err, engine.ErrValidation):
		return fasthttp.StatusBadRequest, CodeValidation
	case errors.Is(err, engine.ErrNotFound):
		return fasthttp.StatusNotFound, CodeNotFound
	case errors.Is(err, engine.ErrAlreadyExists), errors.Is(err, engine.ErrVersionConflict):
		return fasthttp.StatusConflict, CodeConflict
	case errors.Is(err, engine.ErrTooLarge):
		return fasthttp.StatusRequestEntityTooLarge, CodeTooLarge
	case errors.Is(err, engine.ErrUnavailable), errors.Is(err, engine.ErrDataDirInUse),
		errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return fasthttp.StatusServiceUnavailable, CodeUnavailable
	default:
		return fasthttp.StatusInternalServerError, CodeInternal
	}
}

// errorBody is the one error shape of the API.
type errorBody struct {
	Error errorDetail `json:"error"`
}

type errorDetail struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}
