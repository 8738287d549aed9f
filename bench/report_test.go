package bench

import (
	"errors"
	"strings"
	"testing"
)

// TestPairedSpeedup checks the per-repetition speed-up, and that no pairs
// are made when a failed repetition could have shifted the samples.
func TestPairedSpeedup(t *testing.T) {
	times := &Metric{Stock: []float64{2, 3, 10}, Nixyard: []float64{1, 1, 10}}
	if got := times.PairedSpeedup(); got != 2 {
		t.Errorf("times: paired speed-up %v, want 2 (median of 2, 3, 1)", got)
	}
	rates := &Metric{HigherBetter: true, Stock: []float64{10, 10}, Nixyard: []float64{20, 40}}
	if got := rates.PairedSpeedup(); got != 3 {
		t.Errorf("rates: paired speed-up %v, want 3 (mean of 2 and 4)", got)
	}
	// Stock failed repetition 2 and nixyard repetition 3: two samples
	// each, but the second ones are from different repetitions.
	shifted := &Metric{Stock: []float64{2, 4}, Nixyard: []float64{1, 1}, StockErr: errors.New("rep 2"), NixyardErr: errors.New("rep 3")}
	if got := shifted.PairedSpeedup(); got != 0 {
		t.Errorf("after failed repetitions: paired speed-up %v, want none", got)
	}
	uneven := &Metric{Stock: []float64{2, 4}, Nixyard: []float64{1}}
	if got := uneven.PairedSpeedup(); got != 0 {
		t.Errorf("uneven counts: paired speed-up %v, want none", got)
	}
}

// TestTableNoSpeedup: a row measured against each daemon's own baseline
// shows no speed-up.
func TestTableNoSpeedup(t *testing.T) {
	m := &Metric{Name: "ceiling", Unit: "ratio", Stock: []float64{1.08}, Nixyard: []float64{1.16}, NoSpeedup: true}
	row := strings.Split(Table([]*Metric{m}), "\n")[2]
	if want := "| ceiling (ratio) | 1.08 | 1.16 | – | – | (info) |"; row != want {
		t.Errorf("row %q, want %q", row, want)
	}
	m.NoSpeedup = false
	if row := strings.Split(Table([]*Metric{m}), "\n")[2]; !strings.Contains(row, "×") {
		t.Errorf("without NoSpeedup, no speed-up in %q", row)
	}
}
