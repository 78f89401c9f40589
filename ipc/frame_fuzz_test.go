package ipc

import (
	"bytes"
	stdjson "encoding/json"
	"errors"
	"io"
	"testing"

	json "github.com/goccy/go-json"
)

// FuzzDecodeFrame feeds arbitrary bytes, delivered in reads of arbitrary
// size, to a Reader. It must never panic; every error must be a protocol
// error or io.EOF / io.ErrUnexpectedEOF, and final; every frame returned must
// re-encode to exactly the bytes it was read from.
func FuzzDecodeFrame(f *testing.F) {
	all := encodeAll()
	for _, chunk := range []uint16{0, 1, 7, 16, 17, 100} {
		f.Add(all, chunk)
	}
	for _, tt := range allTypes {
		f.Add(AppendFrame(nil, tt.typ, 0, tt.stream, []byte(tt.payload)), uint16(3))
	}
	f.Add(AppendFrame(nil, TypeEvent, 0, 1, eventPayload(200)), uint16(13))
	f.Add(all[:len(all)-5], uint16(0))                                     // truncated payload
	f.Add(all[:10], uint16(0))                                             // truncated header
	f.Add(rawHeader(1<<20+1, byte(TypeEvent), 0, 1), uint16(0))            // too large
	f.Add(rawHeader(2, 0x42, 0, 1), uint16(0))                             // unknown type
	f.Add(append(rawHeader(2, byte(TypeEvent), 1, 1), "{}"...), uint16(0)) // reserved
	f.Add(AppendFrame(nil, TypeHello, 0, 0, []byte(`[1]`)), uint16(2))     // not an object
	f.Add(AppendFrame(nil, TypePing, 0, 0, []byte{0xff, 0xfe}), uint16(1))

	f.Fuzz(func(t *testing.T, data []byte, chunk uint16) {
		src := &chunkReader{data: data, size: func() int {
			if chunk == 0 {
				return len(data)
			}
			return int(chunk)
		}}
		r := NewReader(src, ReaderConfig{MaxFrame: 1 << 20, BufferSize: 16 + int(chunk%64)})
		off := 0
		for {
			fr, err := r.ReadFrame()
			if err != nil {
				switch {
				case err == io.EOF:
					if off != len(data) {
						t.Fatalf("io.EOF at offset %d of %d", off, len(data))
					}
				case errors.Is(err, io.ErrUnexpectedEOF),
					errors.Is(err, ErrFrameTooLarge), errors.Is(err, ErrUnknownType),
					errors.Is(err, ErrReservedNotZero), errors.Is(err, ErrBadJSON):
				default:
					t.Fatalf("untyped error: %v", err)
				}
				if _, err2 := r.ReadFrame(); err2 != err {
					t.Fatalf("error not sticky: %v then %v", err, err2)
				}
				return
			}
			n := HeaderSize + int(fr.Length)
			if len(fr.Payload) != int(fr.Length) || off+n > len(data) {
				t.Fatalf("frame %+v with %d payload bytes at offset %d of %d", fr.Header, len(fr.Payload), off, len(data))
			}
			if got := AppendFrame(nil, fr.Type, fr.Flags, fr.Stream, fr.Payload); !bytes.Equal(got, data[off:off+n]) {
				t.Fatalf("re-encoding differs at offset %d:\n got % x\nwant % x", off, got, data[off:off+n])
			}
			if err := CheckPayload(fr.Type, fr.Payload); err != nil {
				t.Fatalf("returned frame fails CheckPayload: %v", err)
			}
			off += n
			fr.Release()
		}
	})
}

// FuzzValidAgreesWithStdlib holds CheckPayload's JSON validator (goccy's,
// several times faster) to the standard library's verdict on every input:
// the protocol accepts exactly the JSON encoding/json accepts.
func FuzzValidAgreesWithStdlib(f *testing.F) {
	for _, s := range []string{
		`{}`, `{"a":1}`, `{"a":"\u00e9"}`, `{"a":[1,2,{"b":null}]}`, `{"a":1e5}`, `{"a":-0.5E-3}`,
		"{\"a\":\"\x01\"}", `{"a":01}`, `{"a":1.}`, `{"a" :  true }  `, `{"a":"\ud800"}`, `[1]`,
		`{"a":1}{`, `{"a":1,}`, `{"a":tru}`, `{"a":"\x"}`, "{\"a\":\"\xff\"}", ` `, ``, `{"a":-}`,
	} {
		f.Add([]byte(s))
	}
	f.Add(eventPayload(200))
	f.Fuzz(func(t *testing.T, p []byte) {
		if got, want := json.Valid(p), stdjson.Valid(p); got != want {
			t.Fatalf("Valid(%q) = %v, encoding/json says %v", p, got, want)
		}
	})
}
