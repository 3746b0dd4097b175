package ipc

import (
	"slices"
	"testing"
	"time"
)

// BenchmarkLeaseRoundTrip measures one permit refill as a worker sees it:
// LeaseRequest out, LeaseGrant back, over a real socketpair with the master
// side answering in its own goroutine. ns/op is the refill latency.
func BenchmarkLeaseRoundTrip(b *testing.B) {
	master, worker := pair(b)
	go func() {
		for {
			m, err := master.Recv()
			if err != nil {
				return
			}
			req, err := Decode(m)
			if err != nil {
				return
			}
			if master.SendBody(LeaseGrant{N: req.(LeaseRequest).Want}) != nil {
				return
			}
		}
	}()
	// The last 64Ki round trips, for percentiles.
	lat := make([]time.Duration, 1<<16)
	n := 0
	b.ReportAllocs()
	for b.Loop() {
		t0 := time.Now()
		if err := worker.SendBody(LeaseRequest{Want: 64}); err != nil {
			b.Fatal(err)
		}
		m, err := worker.Recv()
		if err != nil {
			b.Fatal(err)
		}
		g, err := Decode(m)
		if err != nil || g.(LeaseGrant).N != 64 {
			b.Fatalf("got %v, %v; want a grant of 64", g, err)
		}
		lat[n%len(lat)] = time.Since(t0)
		n++
	}
	lat = lat[:min(n, len(lat))]
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds()), "p50-ns")
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds()), "p99-ns")
}

// BenchmarkStatsPush measures the throughput of Stats frames from a worker
// to a master that decodes them: a full frame is HeaderSize+statsSize
// bytes.
func BenchmarkStatsPush(b *testing.B) {
	master, worker := pair(b)
	s := Stats{Delta: fullSnapshot()}
	b.SetBytes(int64(HeaderSize + statsSize))
	b.ReportAllocs()
	n := b.N
	done := make(chan error, 1)
	go func() {
		for range n {
			m, err := master.Recv()
			if err != nil {
				done <- err
				return
			}
			if _, err := Decode(m); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	b.ResetTimer()
	for range n {
		if err := worker.SendBody(s); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "frames/s")
}

// BenchmarkSendRecvSmall measures the cost of one small frame (a Ping)
// through the kernel in one goroutine: Send, then Recv of the same frame,
// with no goroutine wake-up in between.
func BenchmarkSendRecvSmall(b *testing.B) {
	master, worker := pair(b)
	m, err := Encode(Ping{Seq: 1})
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(HeaderSize + len(m.Payload)))
	b.ReportAllocs()
	for b.Loop() {
		if err := master.Send(m); err != nil {
			b.Fatal(err)
		}
		if _, err := worker.Recv(); err != nil {
			b.Fatal(err)
		}
	}
}
