package build

import (
	"context"
	"testing"
)

// TestSlotsSharedByJob: the requests of one CI job count as one caller
// for the build slots: a freed slot goes to another job's waiting request
// before the next of a job that already runs builds, however many
// requests that job has waiting (one job running six nix-builds at once
// took a slot in turn with each of them: the CI-scale audit); callers of
// no job count each as their own.
func TestSlotsSharedByJob(t *testing.T) {
	ctx := context.Background()
	s := newSlots(2)
	a1, a2, a3 := s.client(0, "job-a"), s.client(0, "job-a"), s.client(0, "job-a")
	b := s.client(0, "job-b")
	host1, host2 := s.client(0, ""), s.client(0, "")
	granted := make(chan string, 8)
	wait := func(name string, c *slotClient) func() {
		rel, err := s.acquire(ctx, c)
		if err != nil {
			t.Fatal(err)
		}
		granted <- name
		return rel
	}
	relA1, relA2 := wait("a1", a1), wait("a2", a2) // both slots, to job a
	release := make(chan func(), 4)
	// queue has c wait for a slot, and returns once it does.
	queue := func(name string, c *slotClient) {
		rel := queueSlot(t, s, c)
		go func() {
			r := <-rel
			granted <- name
			release <- r
		}()
	}
	queue("a3", a3)
	queue("b", b)
	<-granted
	<-granted
	relA1()
	if got := <-granted; got != "b" {
		t.Fatalf("the freed slot went to %s, want b: job a runs a build, job b none", got)
	}
	relA2()
	if got := <-granted; got != "a3" {
		t.Fatalf("the next freed slot went to %s, want a3", got)
	}
	(<-release)()
	(<-release)()

	// Callers of no job are their own: the one running nothing goes first.
	relH1 := wait("host1", host1)
	relOther := wait("host2", host2)
	queue("host1-again", host1)
	host3 := s.client(0, "")
	queue("host3", host3)
	<-granted
	<-granted
	relOther()
	if got := <-granted; got != "host3" {
		t.Fatalf("the freed slot went to %s, want host3 (host1 runs one already)", got)
	}
	relH1()
	<-granted
	(<-release)()
	(<-release)()
	for _, c := range []*slotClient{a1, a2, a3, b, host1, host2, host3} {
		s.closeClient(c)
	}
	if len(s.shares) != 0 || s.running != 0 {
		t.Errorf("after every client closed: shares %v, %d running", s.shares, s.running)
	}

	// One slot: the job served last waits its turn, though its requests
	// came first.
	s = newSlots(1)
	a1, a2, b = s.client(0, "job-a"), s.client(0, "job-a"), s.client(0, "job-b")
	relA1 = wait("a1", a1)
	<-granted
	queue("a2", a2)
	queue("b", b)
	relA1()
	if got := <-granted; got != "b" {
		t.Fatalf("with one slot, the freed slot went to %s, want b: job a was served last", got)
	}
	(<-release)()
	<-granted
	(<-release)()
}

// TestSlotsNewcomersDoNotStarve: a caller that has had a slot and waits
// for another is not put behind every caller that comes after it.
func TestSlotsNewcomersDoNotStarve(t *testing.T) {
	ctx := context.Background()
	s := newSlots(1)
	a := s.client(0, "job-a")
	rel, err := s.acquire(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	aGranted := queueSlot(t, s, a)
	for i := range 3 {
		newcomer := queueSlot(t, s, s.client(0, ""))
		rel()
		select {
		case rel = <-aGranted:
			rel()
			(<-newcomer)()
			return
		case rel = <-newcomer:
			t.Logf("newcomer %d went first", i)
		}
	}
	t.Fatal("a waited behind every newcomer")
}

// queueSlot has c wait for a slot of s, in a goroutine, and returns once
// it waits; the slot's release comes on the channel once it is granted.
func queueSlot(t *testing.T, s *slots, c *slotClient) <-chan func() {
	t.Helper()
	granted := make(chan func(), 1)
	go func() {
		rel, err := s.acquire(context.Background(), c)
		if err != nil {
			t.Error(err)
		}
		granted <- rel
	}()
	waitUntil(t, "a caller to wait for a slot", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(c.waiting) == 1
	})
	return granted
}
