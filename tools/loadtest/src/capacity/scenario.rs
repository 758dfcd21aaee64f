//! A load scenario, from TOML: the stages that set the offered rate over time, the mix of
//! operations, and the thresholds that set the exit code.
//!
//! ```toml
//! [[stages]]
//! kind = "ramp"          # constant | ramp | steps | spike
//! from = 10              # operations per second
//! to = 100
//! duration = "20s"
//!
//! [mix]                  # relative weights
//! upload_photo = 1
//! read_item = 6
//! read_timeline = 2
//! fetch_thumbnail = 2
//! post_events = 1
//!
//! thresholds = ["read_item p99 < 200ms", "processed p99 < 5s", "errors < 1%", "lag bounded"]
//! ```

use std::time::Duration;

use serde::Deserialize;

/// A whole scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Shown in the report.
    #[serde(default = "default_name")]
    pub name: String,
    pub stages: Vec<Stage>,
    pub mix: Mix,
    #[serde(default)]
    pub photos: Photos,
    /// Each is `"<operation> p<percentile> < <duration>"`, `"processed p<percentile> <
    /// <duration>"`, `"errors < <percent>%"` or `"lag bounded"`.
    #[serde(default)]
    pub thresholds: Vec<String>,
}

fn default_name() -> String {
    "scenario".into()
}

/// A duration written the human way: `500ms`, `30s`, `2m`.
fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration like 30s: {e}")))
}

/// How the offered rate (operations per second) moves during one stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Stage {
    Constant {
        rate: f64,
        #[serde(deserialize_with = "duration")]
        duration: Duration,
    },
    /// From `from` to `to`, linearly.
    Ramp {
        from: f64,
        to: f64,
        #[serde(deserialize_with = "duration")]
        duration: Duration,
    },
    /// From `from` up by `step` every `every`, until `to` has had its `every`.
    Steps {
        from: f64,
        to: f64,
        step: f64,
        #[serde(deserialize_with = "duration")]
        every: Duration,
    },
    /// `base`, with `peak` for `spike` in the middle of `duration`.
    Spike {
        base: f64,
        peak: f64,
        #[serde(deserialize_with = "duration")]
        spike: Duration,
        #[serde(deserialize_with = "duration")]
        duration: Duration,
    },
}

impl Stage {
    pub fn duration(&self) -> Duration {
        match *self {
            Stage::Constant { duration, .. }
            | Stage::Ramp { duration, .. }
            | Stage::Spike { duration, .. } => duration,
            Stage::Steps {
                from,
                to,
                step,
                every,
            } => every.saturating_mul(
                (((to - from) / step)
                    .floor()
                    .clamp(0.0, u32::MAX as f64 - 1.0) as u32)
                    + 1,
            ),
        }
    }

    /// The offered rate `at` into the stage, in operations per second.
    pub fn rate(&self, at: Duration) -> f64 {
        let t = at.as_secs_f64();
        match *self {
            Stage::Constant { rate, .. } => rate,
            Stage::Ramp { from, to, duration } => {
                from + (to - from) * (t / duration.as_secs_f64().max(1e-9)).min(1.0)
            }
            Stage::Steps {
                from,
                to,
                step,
                every,
            } => (from + step * (t / every.as_secs_f64()).floor()).min(to),
            Stage::Spike {
                base,
                peak,
                spike,
                duration,
            } => {
                let start = (duration.saturating_sub(spike) / 2).as_secs_f64();
                if t >= start && t < start + spike.as_secs_f64() {
                    peak
                } else {
                    base
                }
            }
        }
    }
}

/// Relative weights of the operations; 0 leaves one out.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mix {
    /// A photo through the streamed upload: one multipart `POST /v1/media`.
    pub upload_photo: u32,
    /// A photo through the direct upload: `POST /v1/uploads`, the bytes to its signed URL,
    /// then `POST /v1/uploads/{id}/complete`; latency covers all three.
    pub upload_direct: u32,
    pub read_item: u32,
    pub read_timeline: u32,
    pub fetch_thumbnail: u32,
    pub post_events: u32,
}

/// The photos uploads send: generated noise JPEGs, cycled.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Photos {
    /// `WIDTHxHEIGHT`.
    pub size: String,
    /// Distinct files made (each upload sends one, in turn, with a few bytes made unique).
    pub count: usize,
}

impl Default for Photos {
    fn default() -> Self {
        Photos {
            size: "800x600".into(),
            count: 8,
        }
    }
}

/// One operation of the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    UploadPhoto,
    UploadDirect,
    ReadItem,
    ReadTimeline,
    FetchThumbnail,
    PostEvents,
}

impl Op {
    pub const ALL: [Op; 6] = [
        Op::UploadPhoto,
        Op::UploadDirect,
        Op::ReadItem,
        Op::ReadTimeline,
        Op::FetchThumbnail,
        Op::PostEvents,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::UploadPhoto => "upload_photo",
            Op::UploadDirect => "upload_direct",
            Op::ReadItem => "read_item",
            Op::ReadTimeline => "read_timeline",
            Op::FetchThumbnail => "fetch_thumbnail",
            Op::PostEvents => "post_events",
        }
    }

    /// This operation's weight in `mix`.
    pub fn weight(self, mix: &Mix) -> u32 {
        match self {
            Op::UploadPhoto => mix.upload_photo,
            Op::UploadDirect => mix.upload_direct,
            Op::ReadItem => mix.read_item,
            Op::ReadTimeline => mix.read_timeline,
            Op::FetchThumbnail => mix.fetch_thumbnail,
            Op::PostEvents => mix.post_events,
        }
    }
}

/// A rule that sets the exit code.
#[derive(Debug, Clone, PartialEq)]
pub enum Threshold {
    /// An operation's (or `processed`'s, for `None`) latency percentile under a bound.
    Latency {
        op: Option<Op>,
        percentile: f64,
        below: Duration,
    },
    /// Failed operations under this share of all, in percent.
    Errors { below_percent: f64 },
    /// Every group's lag at the end no more than at its highest in the first half, plus 10:
    /// it stopped growing.
    LagBounded,
}

impl Threshold {
    /// # Errors
    /// A rule in none of the documented forms, named.
    pub fn parse(text: &str) -> Result<Threshold, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let forms = "expected \"<operation> p99 < 200ms\", \"processed p99 < 5s\", \
                     \"errors < 1%\" or \"lag bounded\"";
        let bad = || format!("threshold {text:?}: {forms}");
        let percent_rule = || {
            format!(
                "threshold {text:?}: the percent must be above 0 and at most 100, written with \
                 no space before %, like \"errors < 1%\""
            )
        };
        match words.as_slice() {
            ["lag", "bounded"] => Ok(Threshold::LagBounded),
            ["errors", "<", _, "%"] => Err(percent_rule()),
            ["errors", "<", percent] => percent
                .strip_suffix('%')
                .and_then(|p| p.parse::<f64>().ok())
                .filter(|p| (0.0..=100.0).contains(p) && *p > 0.0)
                .map(|below_percent| Threshold::Errors { below_percent })
                .ok_or_else(percent_rule),
            [what, percentile, "<", bound] => {
                let op = match *what {
                    "processed" => None,
                    name => Some(
                        Op::ALL
                            .into_iter()
                            .find(|op| op.name() == name)
                            .ok_or_else(|| {
                                let names: Vec<&str> = Op::ALL.iter().map(|op| op.name()).collect();
                                format!(
                                    "threshold {text:?}: {name:?} is not an operation; the \
                                 operations are {} (or `processed`)",
                                    names.join(", ")
                                )
                            })?,
                    ),
                };
                let percentile = percentile
                    .strip_prefix('p')
                    .and_then(|p| p.parse::<f64>().ok())
                    .filter(|p| (0.0..=100.0).contains(p))
                    .ok_or_else(|| {
                        format!("threshold {text:?}: {percentile:?} is not a percentile like p99")
                    })?;
                let below = humantime::parse_duration(bound).map_err(|_| {
                    format!(
                        "threshold {text:?}: {bound:?} is not a duration with a unit, like 200ms"
                    )
                })?;
                Ok(Threshold::Latency {
                    op,
                    percentile,
                    below,
                })
            }
            _ => Err(bad()),
        }
    }
}

/// The highest rate a stage may offer, operations per second: past what one generator
/// process drives (about 20,000 reads a second on 2 cores, `docs/benchmarks.md`).
pub const MAX_RATE: f64 = 1_000_000.0;
/// The most the weights of a mix may add up to.
pub const MAX_WEIGHT: u32 = 1_000_000;

impl Scenario {
    /// Reads and checks a scenario.
    ///
    /// # Errors
    /// TOML that does not parse (with the field), no stages, an empty mix, a negative rate, or
    /// a threshold in no documented form.
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        if scenario.stages.is_empty() {
            return Err("a scenario needs at least one [[stages]]".into());
        }
        if Op::ALL.iter().all(|op| op.weight(&scenario.mix) == 0) {
            return Err("[mix] gives every operation a weight of 0".into());
        }
        if Op::ALL
            .iter()
            .map(|op| u64::from(op.weight(&scenario.mix)))
            .sum::<u64>()
            > u64::from(MAX_WEIGHT)
        {
            return Err(format!(
                "[mix] weights add up to more than {MAX_WEIGHT}; they are relative, so use \
                 smaller ones"
            ));
        }
        for (i, stage) in scenario.stages.iter().enumerate() {
            let n = i + 1;
            let (kind, rates) = match *stage {
                Stage::Constant { rate, .. } => ("constant", vec![rate]),
                Stage::Ramp { from, to, .. } => ("ramp", vec![from, to]),
                Stage::Steps { from, to, step, .. } => ("steps", vec![from, to, step]),
                Stage::Spike { base, peak, .. } => ("spike", vec![base, peak]),
            };
            if rates.iter().any(|r| !r.is_finite() || *r < 0.0) {
                return Err(format!(
                    "stage {n} ({kind}): a rate is negative or not a number; rates are \
                     operations per second, 0 or more"
                ));
            }
            if rates.iter().any(|r| *r > MAX_RATE) {
                return Err(format!(
                    "stage {n} ({kind}): a rate is over {MAX_RATE} operations per second, \
                     more than one generator offers; run several"
                ));
            }
            if stage.duration() > super::MAX_DURATION {
                return Err(format!(
                    "stage {n} ({kind}): it runs {:?}, over the bound of {:?} for a run",
                    stage.duration(),
                    super::MAX_DURATION
                ));
            }
            if stage.duration().is_zero() {
                return Err(format!("stage {n} ({kind}): it has no length"));
            }
            match *stage {
                Stage::Steps {
                    from,
                    to,
                    step,
                    every,
                } if step <= 0.0 || to < from || every.is_zero() => {
                    return Err(format!(
                        "stage {n} (steps): it needs from <= to, a step above 0 and an \
                         `every` above 0s"
                    ));
                }
                Stage::Spike {
                    spike, duration, ..
                } if spike > duration => {
                    return Err(format!(
                        "stage {n} (spike): the spike ({spike:?}) is longer than the stage \
                         ({duration:?})"
                    ));
                }
                _ => {}
            }
        }
        scenario
            .photos
            .size
            .split_once('x')
            .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
            .filter(|&(w, h)| (1..=10_000).contains(&w) && (1..=10_000).contains(&h))
            .ok_or_else(|| {
                format!(
                    "[photos] size {:?}: expected WIDTHxHEIGHT, such as 800x600",
                    scenario.photos.size
                )
            })?;
        let uploads = scenario.mix.upload_photo + scenario.mix.upload_direct;
        for t in &scenario.thresholds {
            match Threshold::parse(t)? {
                Threshold::Latency { op: Some(op), .. } if op.weight(&scenario.mix) == 0 => {
                    return Err(format!(
                        "threshold {t:?}: {} has no weight in [mix], so it is never measured",
                        op.name()
                    ));
                }
                Threshold::Latency { op: None, .. } if uploads == 0 => {
                    return Err(format!(
                        "threshold {t:?}: [mix] uploads nothing (upload_photo, upload_direct), \
                         so nothing is processed to measure"
                    ));
                }
                _ => {}
            }
        }
        Ok(scenario)
    }

    pub fn duration(&self) -> Duration {
        self.stages.iter().map(Stage::duration).sum()
    }

    /// The offered rate `at` into the run; 0 after the end.
    pub fn rate(&self, at: Duration) -> f64 {
        let mut start = Duration::ZERO;
        for stage in &self.stages {
            let end = start + stage.duration();
            if at < end {
                return stage.rate(at - start);
            }
            start = end;
        }
        0.0
    }

    /// The operation for a draw `u` in `0..total weight`.
    pub fn pick(&self, u: u32) -> Op {
        let mut left = u;
        for op in Op::ALL {
            let w = op.weight(&self.mix);
            if left < w {
                return op;
            }
            left -= w;
        }
        Op::ReadItem
    }

    pub fn total_weight(&self) -> u32 {
        Op::ALL.iter().map(|op| op.weight(&self.mix)).sum()
    }

    pub fn thresholds(&self) -> Vec<(String, Threshold)> {
        self.thresholds
            .iter()
            .map(|t| (t.clone(), Threshold::parse(t).expect("checked by parse")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_set_the_rate_over_time() {
        let s = Scenario::parse(
            r#"
            thresholds = ["read_item p99 < 200ms", "processed p99.9 < 5s", "errors < 1%", "lag bounded"]
            [[stages]]
            kind = "ramp"
            from = 0
            to = 100
            duration = "10s"
            [[stages]]
            kind = "steps"
            from = 10
            to = 30
            step = 10
            every = "2s"
            [[stages]]
            kind = "spike"
            base = 5
            peak = 50
            spike = "2s"
            duration = "10s"
            [mix]
            read_item = 3
            upload_photo = 1
            "#,
        )
        .unwrap();
        assert_eq!(s.duration(), Duration::from_secs(26));
        assert_eq!(s.rate(Duration::from_secs(5)), 50.0);
        assert_eq!(s.rate(Duration::from_secs(11)), 10.0);
        assert_eq!(s.rate(Duration::from_secs(15)), 30.0);
        assert_eq!(s.rate(Duration::from_secs(17)), 5.0);
        assert_eq!(s.rate(Duration::from_secs(21)), 50.0);
        assert_eq!(s.rate(Duration::from_secs(26)), 0.0);
        assert_eq!(
            (s.pick(0), s.pick(1), s.pick(3)),
            (Op::UploadPhoto, Op::ReadItem, Op::ReadItem)
        );
        assert_eq!(s.thresholds().len(), 4);
    }

    #[test]
    fn mistakes_are_named() {
        let no_mix = "[[stages]]\nkind = \"constant\"\nrate = 1\nduration = \"1s\"\n[mix]\n";
        assert!(Scenario::parse(no_mix).unwrap_err().contains("weight of 0"));
        let typo =
            "[[stages]]\nkind = \"constant\"\nrat = 1\nduration = \"1s\"\n[mix]\nread_item = 1\n";
        assert!(Scenario::parse(typo).unwrap_err().contains("rat"));
        assert!(
            Threshold::parse("read_itme p99 < 1s")
                .unwrap_err()
                .contains("\"read_itme\" is not an operation")
        );
        assert!(
            Threshold::parse("read_item p99 < 200")
                .unwrap_err()
                .contains("with a unit")
        );
        let stage = "[[stages]]\nkind = \"steps\"\nfrom = 50\nto = 5\nstep = 5\nevery = \"1s\"\n\
                     [mix]\nread_item = 1\n";
        assert!(
            Scenario::parse(stage)
                .unwrap_err()
                .contains("stage 1 (steps)")
        );
        let unmeasured = "thresholds = [\"post_events p99 < 1s\"]\n[[stages]]\nkind = \"constant\"\n\
                          rate = 1\nduration = \"1s\"\n[mix]\nread_item = 1\n";
        assert!(
            Scenario::parse(unmeasured)
                .unwrap_err()
                .contains("never measured")
        );
    }

    /// What the review found accepted, or panicking later: each is refused up front.
    #[test]
    fn out_of_bounds_scenarios_are_refused() {
        let with = |stage: &str, mix: &str, thresholds: &str| {
            Scenario::parse(&format!(
                "thresholds = {thresholds}\n[[stages]]\n{stage}\n[mix]\n{mix}\n"
            ))
            .unwrap_err()
        };
        let constant = "kind = \"constant\"\nrate = 1\nduration = \"1s\"";
        assert!(
            with(constant, "read_item = 4294967295\nupload_photo = 1", "[]").contains("add up")
        );
        let huge = "kind = \"steps\"\nfrom = 1\nto = 1e12\nstep = 1\nevery = \"1s\"";
        assert!(with(huge, "read_item = 1", "[]").contains("over 1000000"));
        let long = "kind = \"constant\"\nrate = 1\nduration = \"500000000000years\"";
        assert!(with(long, "read_item = 1", "[]").contains("over the bound"));
        let many = "kind = \"steps\"\nfrom = 1\nto = 100000\nstep = 1\nevery = \"1s\"";
        assert!(with(many, "read_item = 1", "[]").contains("over the bound"));
        assert!(
            with(constant, "read_item = 1", "[\"processed p99 < 5s\"]").contains("uploads nothing")
        );
        for bad in [
            "errors < NaN%",
            "errors < -5%",
            "errors < 1 %",
            "errors < 0%",
        ] {
            assert!(
                Threshold::parse(bad).unwrap_err().contains("above 0"),
                "{bad}"
            );
        }
    }
}
